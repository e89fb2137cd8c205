"""Codes as uint64 words, and a NumPy top-k for searches too small to pay for loading the kernels.

A fresh process opens the compiled kernels in a few milliseconds, but the first one after an install
or a change of the kernels builds them (~20 s, see `native`); a search of a few queries against a
few thousand codes takes microseconds. Below `TINY_WORK` word comparisons, in a process that has not
loaded the kernels, the exact index ranks with NumPy's own popcount (`np.bitwise_count`, NumPy >= 2.0)
and a stable sort: the same (distance, index) order, with nothing to load or build.
"""

from __future__ import annotations

import numpy as np

from dsah_rt import native

# queries x database x words below which NumPy's whole (Q, N) distance matrix is used: 2^20
# comparisons build an 8 MB matrix in ~5 ms.
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
    """True when NumPy should rank: a small search in a process that has not loaded the kernels yet
    (whose library may still have to be built, see `native`).

    Once they are loaded (a service, a second search) the kernels win at every size: measured 34 ms
    with NumPy against ~1 ms for 40 queries x 20,000 codes.
    """
    return queries * database * nwords <= TINY_WORK and not native.loaded()


def topk(query_words: np.ndarray, db_words: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k) int32, indices (Q, k) int64) by (distance, index), as the kernels give them."""
    dist = np.bitwise_count(query_words[:, None, :] ^ db_words[None, :, :]).sum(axis=2, dtype=np.int32)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order.astype(np.int64)
