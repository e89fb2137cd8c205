"""Retrieval metrics over Hamming ranking: MAP (index-order and tie-aware), P@k, R@k, PR, radius.

Conventions (stated once, used by the CLI, the trainer and the benchmarks alike):
- Relevant: same class id, or (multi-hot labels) at least one shared label.
- Ranking: by Hamming distance, ties by database index. No database item is dropped.
- AP@all averages precision at every relevant item. AP@K (topk) averages over the relevant items
  retrieved in the top K (the deep-hashing codebases' `CalcTopMap` normalisation). A query with no
  relevant item (in the top K) has AP 0 and is counted in `queries_without_relevant`.
- Tie-aware AP (He et al., CVPR 2018) is the expected AP@all under a random order inside each
  equal-distance group; best/worst put a group's relevant items first/last.
- Precision within radius r: relevant / retrieved among items at distance <= r, 0 when nothing is
  retrieved (the HashNet/DHN convention); recall within r: relevant retrieved / all relevant.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dsah_rt import hamming
from dsah_rt.codes import read_codes, read_labels, to_packed
from dsah_rt.errors import CodesError


def default_grid(n: int, topk: int | None = None) -> np.ndarray:
    """Cut-offs for P@k / R@k curves: 1, 2, 5, 10, 20, 50, ... up to n, or up to topk when given."""
    last = min(topk, n) if topk else n
    steps = [m * 10**e for e in range(10) for m in (1, 2, 5) if m * 10**e <= last]
    return np.unique(np.asarray(steps + [last], dtype=np.int64))


def _check_labels(qlab: np.ndarray, dblab: np.ndarray, nq: int, ndb: int) -> None:
    for name, lab, rows in (("query labels", qlab, nq), ("database labels", dblab, ndb)):
        if lab.ndim not in (1, 2):
            raise CodesError(f"{name}: expected (N,) class ids or (N, C) multi-hot, got shape {lab.shape}")
        if len(lab) != rows:
            raise CodesError(f"{name}: {len(lab)} rows but the codes have {rows} rows")
    if qlab.ndim != dblab.ndim or (qlab.ndim == 2 and qlab.shape[1] != dblab.shape[1]):
        raise CodesError(f"query labels {qlab.shape} and database labels {dblab.shape} are of different kinds")


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measures; `to_dict()` is what `dsah-rt eval --json` writes, key for key.

    The curves are plain lists (JSON-ready): `pr_curve` {"radius", "precision", "recall"} over radius
    0..bits, `precision_at_k` {"k", "precision"} and `recall_at_k` {"k", "recall"} over the grid.
    """

    FORMAT: ClassVar[str] = "dsah-rt-eval/1"

    map: float
    map_tie_aware: float
    map_tie_best: float
    map_tie_worst: float
    precision_at_radius: float
    recall_at_radius: float
    radius: int
    queries_empty_at_radius: int
    queries: int
    database: int
    bits: int
    topk: int
    queries_without_relevant: int
    seconds: float
    pr_curve: dict[str, list[float]]
    precision_at_k: dict[str, list[float]]
    recall_at_k: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, led by its format key so a reader can tell the layout's version."""
        return {"format": self.FORMAT, **dataclasses.asdict(self)}


def evaluate(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    bits: int | None = None,
    topk: int | None = None,
    radius: int = 2,
    grid: np.ndarray | None = None,
) -> Evaluation:
    """All retrieval metrics in one pass pair over the database. Codes: packed uint8, ±1 or 0/1."""
    qp, k = to_packed(query_codes, bits, where="query codes")
    dp, kdb = to_packed(db_codes, bits if bits is not None else k, where="database codes")
    if k != kdb:
        raise CodesError(f"query codes have {k} bits but database codes have {kdb}")
    qlab, dblab = np.asarray(query_labels), np.asarray(db_labels)
    _check_labels(qlab, dblab, len(qp), len(dp))
    if len(dp) == 0 or len(qp) == 0:
        raise CodesError("need at least one query and one database code")
    topk = None if not topk else int(topk)
    if topk is not None and topk < 0:
        raise CodesError(f"--topk must be >= 0, got {topk}")
    if not 0 <= radius <= k:
        raise CodesError(f"radius {radius} is outside 0..{k}")
    grid = default_grid(len(dp), topk) if grid is None else np.unique(np.asarray(grid, np.int64))

    start = time.perf_counter()
    qw, dw = hamming.words(qp), hamming.words(dp)
    qlw, dlw = hamming.label_words(qlab, dblab)
    hist = hamming.relevance_histograms(qw, dw, qlw, dlw, k)
    ap, found, at_grid = hamming.index_order_ap(qw, dw, qlw, dlw, hist, topk or 0, grid)
    tie_mean, tie_best, tie_worst = hamming.tie_aware_ap(hist)
    seconds = time.perf_counter() - start

    relevant = hist[:, :, 1].sum(axis=1)
    cum_all = hist.sum(axis=2).cumsum(axis=1)
    cum_rel = hist[:, :, 1].cumsum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_r = np.where(cum_all > 0, cum_rel / cum_all, 0.0)  # (Q, k+1)
        recall_r = np.where(relevant[:, None] > 0, cum_rel / relevant[:, None], 0.0)
        recall_k = np.where(relevant[:, None] > 0, at_grid / relevant[:, None], 0.0)
    return Evaluation(
        map=float(ap.mean()),
        map_tie_aware=float(tie_mean.mean()),
        map_tie_best=float(tie_best.mean()),
        map_tie_worst=float(tie_worst.mean()),
        precision_at_radius=float(precision_r[:, radius].mean()),
        recall_at_radius=float(recall_r[:, radius].mean()),
        radius=radius,
        queries_empty_at_radius=int((cum_all[:, radius] == 0).sum()),
        queries=len(qp),
        database=len(dp),
        bits=k,
        topk=topk or 0,
        queries_without_relevant=int(((found if topk else relevant) == 0).sum()),
        seconds=seconds,
        pr_curve={
            "radius": list(range(k + 1)),
            "precision": precision_r.mean(axis=0).tolist(),
            "recall": recall_r.mean(axis=0).tolist(),
        },
        precision_at_k={"k": grid.tolist(), "precision": (at_grid / grid).mean(axis=0).tolist()},
        recall_at_k={"k": grid.tolist(), "recall": recall_k.mean(axis=0).tolist()},
    )


def evaluate_files(
    query_codes: str | os.PathLike[str],
    db_codes: str | os.PathLike[str],
    query_labels: str | os.PathLike[str],
    db_labels: str | os.PathLike[str],
    bits: int | None = None,
    topk: int | None = None,
    radius: int = 2,
    zeros_as: str | None = None,
) -> Evaluation:
    """`dsah-rt eval`: `evaluate` on codes and labels files (`zeros_as` as for `read_codes`)."""
    q = read_codes(query_codes, bits, zeros_as=zeros_as)
    d = read_codes(db_codes, bits, zeros_as=zeros_as)
    if q.bits != d.bits:
        raise CodesError(f"{query_codes} has {q.bits}-bit codes but {db_codes} has {d.bits}-bit codes")
    ql = read_labels(query_labels, rows=len(q))
    dl = read_labels(db_labels, rows=len(d))
    return evaluate(q.packed, d.packed, ql, dl, bits=q.bits, topk=topk, radius=radius)
