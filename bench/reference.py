"""The anchors our kernels are measured against: the deep-hashing codebases' NumPy MAP, as written.

`numpy_map` follows the `CalcMap` / `CalcTopMap` functions that DPSH/DSH-style repositories copy
(±1 codes, distances from inner products, `np.argsort`, cumulative precision), with `kind` and `topk`
exposed so the known defects can be shown: quicksort orders ties arbitrarily, and `topk=-1` slices
`[0:-1]`, dropping the last database item. With kind="stable" it is our index-order MAP.
"""

from __future__ import annotations

import numpy as np


def numpy_map(
    q_pm1: np.ndarray, db_pm1: np.ndarray, q_onehot: np.ndarray, db_onehot: np.ndarray,
    topk: int | None = None, kind: str = "quicksort",
) -> float:
    k = q_pm1.shape[1]
    total = 0.0
    for i in range(len(q_pm1)):
        gnd = (q_onehot[i] @ db_onehot.T > 0).astype(np.float32)
        hamm = 0.5 * (k - q_pm1[i] @ db_pm1.T)
        gnd = gnd[np.argsort(hamm, kind=kind)]
        tgnd = gnd[0:topk] if topk is not None else gnd
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(tgnd == 1)) + 1.0
        total += np.mean(count / tindex)
    return total / len(q_pm1)


def numpy_tie_aware_map(q_pm1: np.ndarray, db_pm1: np.ndarray, q_onehot: np.ndarray, db_onehot: np.ndarray) -> float:
    """Tie-aware MAP (He et al., CVPR 2018) per query with NumPy: histograms, then each group's sum."""
    k = q_pm1.shape[1]
    total = 0.0
    for i in range(len(q_pm1)):
        rel = q_onehot[i] @ db_onehot.T > 0
        dist = np.rint(0.5 * (k - q_pm1[i] @ db_pm1.T)).astype(np.int64)
        n_d = np.bincount(dist, minlength=k + 1)
        r_d = np.bincount(dist, weights=rel, minlength=k + 1).astype(np.int64)
        if r_d.sum() == 0:
            continue
        before = np.concatenate([[0], np.cumsum(n_d)[:-1]])
        rel_before = np.concatenate([[0], np.cumsum(r_d)[:-1]])
        ap = 0.0
        for d in np.flatnonzero(r_d):
            j = np.arange(1, n_d[d] + 1)
            slope = (r_d[d] - 1) / (n_d[d] - 1) if n_d[d] > 1 else 0.0
            ap += r_d[d] / n_d[d] * np.sum((rel_before[d] + 1 + (j - 1) * slope) / (before[d] + j))
        total += ap / r_d.sum()
    return total / len(q_pm1)
