"""Multi-index hashing on the compiled kernels (`native`): the tables' keys and sort, top-k, range
counts, range fill.

NumPy and ctypes only, as `ranking`: a process that builds or searches an MIH index loads the
kernels' library and never imports Numba (which cost a fresh `dsah-rt search --index` 0.3 s of its
own clock, measured, issue 12). A search cuts its queries into one block per thread: the more
queries a block holds, the more of them share each bucket read (see `mih_kernels.probe_block`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dsah_rt import native
from dsah_rt.mih_layout import NO_LIMIT
from dsah_rt.native import ptr

# Pairs (a query, a key to probe) one block groups at once (32 MB of scratch at most), and the bits
# of a bucket id the grouping sorts by (its table of counts: 8 MB at most).
MAX_PAIRS = 1 << 20
COUNTING_BITS = 20


def keys(words: np.ndarray, first: int, length: int) -> np.ndarray:
    """(N,) int64: every code's key for the substring [first, first + length) (see `mih_kernels`)."""
    out = np.empty(len(words), np.int64)
    head = (ptr(words), *words.shape, first, length, ptr(out))
    native.run_blocks(native.kernels()["mih_keys"], len(words), max(1 << 16, -(-len(words) // native.threads())),
                      lambda q0, nb, ws: (*head, q0, nb, ptr(ws), len(ws)))  # fmt: skip
    return out


def counting_sort(digits: np.ndarray, order: np.ndarray, nbuckets: int) -> tuple[np.ndarray, np.ndarray]:
    """uint32 `order` stably sorted by digits[order], and the bucket offsets (nbuckets + 1,) int64."""
    digits, order = np.ascontiguousarray(digits, np.int64), np.ascontiguousarray(order, np.uint32)
    out, offsets = np.empty_like(order), np.empty(nbuckets + 1, np.int64)
    native.kernels()["mih_sort"](ptr(digits), ptr(order), len(order), nbuckets, ptr(out), ptr(offsets))
    return out, offsets


def _probe(qw: np.ndarray, tables: Sequence[np.ndarray], which: np.ndarray, lims: np.ndarray, out: np.ndarray, k: int,
           radius: int, budget: int) -> np.ndarray:  # fmt: skip
    """held (see `mih_kernels.probe_block`) of queries `which`, their results into `out` by `lims`."""
    rows, perm, low, offsets, layout = (np.ascontiguousarray(a) for a in tables)
    which, lims = np.ascontiguousarray(which, np.int64), np.ascontiguousarray(lims, np.int64)
    held = np.empty(len(which), np.int64)
    head = (ptr(qw), *qw.shape, ptr(rows), rows.shape[1], ptr(perm), ptr(low), low.shape[1], ptr(offsets),
            len(offsets), ptr(layout), len(layout), k, radius, budget, ptr(which), len(which), ptr(lims), ptr(out),
            out.size, ptr(held))  # fmt: skip
    native.run_blocks(native.kernels()["mih"], len(which), -(-len(which) // native.threads()),
                      lambda q0, nb, ws: (*head, q0, nb, MAX_PAIRS, COUNTING_BITS, ptr(ws), len(ws)))  # fmt: skip
    return held


def topk(qw: np.ndarray, tables: Sequence[np.ndarray], k: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) keys (distance << 32 | id) in ascending order, and whether each query stayed in budget
    (the rows of those that did not are undefined)."""
    nq = len(qw)
    out = np.empty((nq, k), np.int64)
    held = _probe(qw, tables, np.arange(nq), np.arange(nq + 1) * k, out, k, -1, budget)
    return out, held >= 0


def range_counts(qw: np.ndarray, tables: Sequence[np.ndarray], radius: int, budget: int) -> np.ndarray:
    """Items within `radius` of each query, or -1 where the query passed its budget."""
    nq = len(qw)
    return _probe(qw, tables, np.arange(nq), np.zeros(nq + 1, np.int64), np.empty(0, np.int64), 0, radius, budget)


def range_fill(qw: np.ndarray, tables: Sequence[np.ndarray], radius: int, which: np.ndarray, lims: np.ndarray,
               out: np.ndarray) -> None:  # fmt: skip
    """Query which[t]'s items, as sorted keys, into out[lims[q]:lims[q + 1]] (sized by range_counts)."""
    _probe(qw, tables, which, lims, out, 0, radius, NO_LIMIT)
