"""Obviously-correct references for the retrieval kernels: unpacked bits, stable sorts, plain loops."""

from __future__ import annotations

import itertools
import math

import numpy as np


def distances(q01: np.ndarray, db01: np.ndarray) -> np.ndarray:
    """Hamming distances by counting differing bits of unpacked 0/1 rows."""
    return (q01[:, None, :] != db01[None, :, :]).sum(axis=2)


def relevance(qlab: np.ndarray, dblab: np.ndarray) -> np.ndarray:
    if qlab.ndim == 1:
        return qlab[:, None] == dblab[None, :]
    return (qlab[:, None, :].astype(bool) & dblab[None, :, :].astype(bool)).any(axis=2)


def ranking(dist_row: np.ndarray) -> np.ndarray:
    """Order by (distance, database index)."""
    return np.lexsort((np.arange(len(dist_row)), dist_row))


def range_search(q01: np.ndarray, db01: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every code within distance <= radius of each query, by (distance, index), in FAISS's range layout."""
    dist = distances(q01, db01)
    hits = [order[row[order] <= radius] for row, order in ((row, ranking(row)) for row in dist)]
    lims = np.concatenate([[0], np.cumsum([len(h) for h in hits])])
    indices = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    return lims, dist[np.repeat(np.arange(len(q01)), np.diff(lims)), indices], indices


def average_precision(rel_in_order: np.ndarray, topk: int | None = None) -> float:
    """AP over a ranked 0/1 list; with topk, normalised by the relevant items inside the top k."""
    rel = np.asarray(rel_in_order, dtype=bool)
    if topk:
        rel = rel[:topk]
    hits = 0
    total = 0.0
    for rank, r in enumerate(rel, start=1):
        if r:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def tie_orderings_ap(dist_row: np.ndarray, rel_row: np.ndarray) -> tuple[float, float, float]:
    """Mean, max and min AP over every ordering consistent with the distances (tiny inputs only)."""
    groups = [np.flatnonzero(dist_row == d) for d in np.unique(dist_row)]
    aps = []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = np.concatenate([np.asarray(p, dtype=np.int64) for p in perms])
        aps.append(average_precision(rel_row[order]))
    return float(np.mean(aps)), float(max(aps)), float(min(aps))


def tie_aware_formula(dist_row: np.ndarray, rel_row: np.ndarray) -> float:
    """He et al. (CVPR 2018) closed form written per item, in float64, for inputs too big to enumerate."""
    total_rel = rel_row.sum()
    if total_rel == 0:
        return 0.0
    ap = 0.0
    before = rel_before = 0
    for d in np.unique(dist_row):
        in_group = dist_row == d
        n = int(in_group.sum())
        r = int(rel_row[in_group].sum())
        for j in range(1, n + 1):
            expected_before = (j - 1) * (r - 1) / (n - 1) if n > 1 else 0.0
            ap += r / n * (rel_before + 1 + expected_before) / (before + j)
        before += n
        rel_before += r
    return ap / total_rel


def precision_within(dist_row: np.ndarray, rel_row: np.ndarray, radius: int) -> float:
    inside = dist_row <= radius
    return float(rel_row[inside].sum() / inside.sum()) if inside.any() else 0.0


def precision_at(rel_in_order: np.ndarray, k: int) -> float:
    return float(np.asarray(rel_in_order[:k], dtype=float).sum() / k)


def assert_close(a: float, b: float, tol: float = 1e-12) -> None:
    assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (a, b)


def assert_ranking_prefix(D: np.ndarray, I: np.ndarray, dist: np.ndarray) -> None:
    """Each row of (D, I) is the first len(I[i]) of the (distance, index) ranking of dist's row."""
    for i, row in enumerate(dist):
        order = ranking(row)[: I.shape[1]]
        np.testing.assert_array_equal(I[i], order)
        np.testing.assert_array_equal(D[i], row[order])
