"""Codes as uint64 words, and a NumPy top-k for searches too small to pay for Numba.

A fresh process pays ~0.3 s to import Numba and ~0.35 s to load the cached kernels before its first
search (measured, issue 12); a search of a few queries against a few thousand codes takes
microseconds. Below `TINY_WORK` word comparisons the exact index ranks with NumPy's own popcount
(`np.bitwise_count`, NumPy >= 2.0) and a stable sort, so the same (distance, index) order comes
back without Numba ever being imported.
"""

from __future__ import annotations

import sys

import numpy as np

# queries x database x words below which NumPy's whole (Q, N) distance matrix is cheaper than
# Numba's start: 2^20 comparisons build an 8 MB matrix in ~5 ms.
TINY_WORK = 1 << 20


def words(packed: np.ndarray) -> np.ndarray:
    """(N, B) packed uint8 -> (N, ceil(B/8)) uint64; zero padding keeps distances unchanged."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    nwords = (packed.shape[1] + 7) // 8
    if packed.shape[1] == nwords * 8:
        return packed.view(np.uint64).reshape(len(packed), nwords)
    out = np.zeros((len(packed), nwords * 8), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    return out.view(np.uint64).reshape(len(packed), nwords)


def is_tiny(queries: int, database: int, nwords: int) -> bool:
    """True when NumPy should rank: a small search in a process that has not loaded the kernels yet.

    Once they are loaded (a service, a second search) Numba wins at every size: measured 34 ms with
    NumPy against ~1 ms for 40 queries x 20,000 codes.
    """
    return queries * database * nwords <= TINY_WORK and "dsah_rt.hamming" not in sys.modules


def topk(query_words: np.ndarray, db_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k) int32, indices (Q, k) int64) by (distance, index), as the kernels give them."""
    dist = np.bitwise_count(query_words[:, None, :] ^ db_words[None, :, :]).sum(axis=2, dtype=np.int32)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order.astype(np.int64)
