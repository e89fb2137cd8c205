"""Exact Hamming ranking on the compiled kernels (`native`): top-k, index-order AP, tie-aware AP.

NumPy and ctypes only: a process that ranks with these never imports Numba (see `native`). Codes are
uint64 word rows (`popcount_numpy.words`); labels are multi-hot uint64 words (`label_words`).
Ranking is "by distance, ties by database index" everywhere.
"""

from __future__ import annotations

import numpy as np

from dsah_rt import native
from dsah_rt.native import ptr
from dsah_rt.popcount_numpy import words

SMALL_K = 4096  # above this, top-k takes the two-pass histogram route (its memory does not grow with k)
TOPK_BLOCK = 128  # most queries per call: each tile of the database is read once for all of them
RANKED_BLOCK = 8  # queries per call: each tile of codes and labels is read once for all of them
# Above this much buffer (threads x RANKED_BLOCK queries x most relevant items x 8 B), index-order AP
# takes Numba's two-pass route (relevance histograms, then the ranks), whose memory does not grow with
# the labels.
FUSED_BUFFER_BYTES = 1 << 30


def topk(qw: np.ndarray, dbw: np.ndarray, bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by (distance, index) in one pass over the database, k <= SMALL_K: (Q, k) int32, int64."""
    nq, nwords = qw.shape
    dist, idx = np.empty((nq, k), np.int32), np.empty((nq, k), np.int64)
    head = (ptr(qw), nq, nwords, ptr(dbw), len(dbw), bits, k)
    tail = (ptr(dist), ptr(idx))
    block = min(TOPK_BLOCK, max(16, -(-nq // (4 * native.threads()))))  # four blocks a thread or more
    native.run_blocks(native.kernels()["topk"], nq, block,
                      lambda q0, nb, ws: (*head, q0, nb, *tail, ws.ctypes.data, len(ws)))  # fmt: skip
    return dist, idx


def label_words(query_labels: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as multi-hot uint64 words for the kernels: relevant iff the words share a set bit.

    Class ids become one-hot over the ids that occur (so relevance is plain equality, and one word
    holds up to 64 classes); multi-hot rows are packed as they are.
    """
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    if query_labels.ndim == 1:
        ids, inverse = np.unique(np.concatenate([query_labels, db_labels]), return_inverse=True)
        onehot = np.zeros((len(inverse), len(ids)), np.uint8)
        onehot[np.arange(len(inverse)), inverse] = 1
        query_labels, db_labels = onehot[: len(query_labels)], onehot[len(query_labels) :]
    pack_ = lambda lab: words(np.packbits(lab.astype(np.uint8), axis=1))  # noqa: E731
    return pack_(query_labels), pack_(db_labels)


def index_order(qw: np.ndarray, dbw: np.ndarray, qlab: np.ndarray, dblab: np.ndarray, bits: int, topk: int,
                grid: np.ndarray, budget: int = FUSED_BUFFER_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Relevance histograms (Q, bits+1, 2), index-order AP, relevant items found in the top K and
    relevant items within each grid cut-off, in one pass over the database.

    topk <= 0 means the whole ranking. AP@K is normalised by the relevant items retrieved in the top K
    (the deep-hashing convention).
    """
    nq, nwords = qw.shape
    n = len(dbw)
    kmax = n if topk <= 0 else min(topk, n)
    grid = np.ascontiguousarray(grid, np.int64)
    hist = np.zeros((nq, bits + 1, 2), np.int64)
    ap, found = np.zeros(nq), np.zeros(nq, np.int64)
    at_grid = np.zeros((nq, len(grid)), np.int64)
    head = (ptr(qw), nq, nwords, ptr(dbw), n, ptr(qlab), qlab.shape[1], ptr(dblab), bits, kmax, ptr(grid), len(grid))
    tail = (ptr(hist), ptr(ap), ptr(found), ptr(at_grid))
    try:
        native.run_blocks(native.kernels()["ranked"], nq, RANKED_BLOCK,
                          lambda q0, nb, ws: (*head, q0, nb, *tail, ws.ctypes.data, len(ws)),
                          limit=budget // (8 * native.threads()))  # fmt: skip
    except native.ScratchLimit:  # so many relevant items a block's buffers would pass the budget
        from dsah_rt import hamming  # Numba's two-pass route: its memory does not grow with the labels

        hist = hamming.relevance_histograms(qw, dbw, qlab, dblab, bits)
        return (hist, *hamming.index_order_ap(qw, dbw, qlab, dblab, hist, topk, grid))
    return hist, ap, found, at_grid


def tie_aware_ap(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie-aware AP (He et al., CVPR 2018) and its best and worst bounds from (Q, bits+1, 2) histograms."""
    hist = np.ascontiguousarray(hist, np.int64)
    nq, nbins = hist.shape[:2]
    mean, best, worst = np.zeros(nq), np.zeros(nq), np.zeros(nq)
    tail = (ptr(mean), ptr(best), ptr(worst))
    native.run_blocks(native.kernels()["tie_aware"], nq, 64,
                      lambda q0, nb, ws: (ptr(hist), nq, nbins, q0, nb, *tail, ws.ctypes.data, len(ws)))  # fmt: skip
    return mean, best, worst
