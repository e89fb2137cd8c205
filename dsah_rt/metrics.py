"""Retrieval metrics over Hamming ranking: MAP (index-order and tie-aware), P@k, R@k, PR, radius.

Conventions (stated once, used by the CLI, the trainer and the benchmarks alike):
- Relevant: same class id (compared exactly, as integers), or (multi-hot labels) at least one
  shared label. Class ids cost O(database) memory whatever their number (one id per object too).
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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dsah_rt import ranking
from dsah_rt.codes import check_same_model, read_codes, read_labels, to_packed
from dsah_rt.errors import CodesError
from dsah_rt.popcount_numpy import words


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
    if qlab.ndim == 1 and not (qlab.dtype.kind in "biu" and dblab.dtype.kind in "biu"):
        raise CodesError(f"class ids must be integers, got {qlab.dtype} (query) and {dblab.dtype} (database)")


def _common_ids(qlab: np.ndarray, dblab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' class ids in one integer type that holds every id exactly.

    NumPy's common type of uint64 and int64 is float64, which merges ids above 2^53 (2^60 and
    2^60 + 1 become one class), so the type is chosen by the values instead.
    """
    for dtype in (np.int64, np.uint64):
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        if all(not lab.size or (lo <= int(lab.min()) and int(lab.max()) <= hi) for lab in (qlab, dblab)):
            return qlab.astype(dtype), dblab.astype(dtype)
    raise CodesError("class ids range from below 0 to above 2^63 - 1: no integer type holds them all")


def _label_words(qlab: np.ndarray, dblab: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(query rows, their label words, the database's label words) for the kernels, which count an
    item relevant when its words share a set bit with the query's.

    Multi-hot labels are one group, packed as they are. Class ids go in groups of queries with at
    most 64 distinct ids: bit i of a word marks the group's i-th id, and a database item whose id is
    none of them gets no bit. One word per item per group keeps memory O(database), where a one-hot
    row over every id would be O(database x classes).
    """
    if qlab.ndim == 2:
        yield np.arange(len(qlab)), *ranking.label_words(qlab, dblab)
        return
    qids, dbids = _common_ids(qlab, dblab)
    ids, slot = np.unique(qids, return_inverse=True)
    one = np.uint64(1)
    for start in range(0, len(ids), 64):
        group = ids[start : start + 64]
        rows = np.flatnonzero((slot >= start) & (slot < start + len(group)))
        at = np.minimum(np.searchsorted(group, dbids), len(group) - 1)
        db_words = np.where(group[at] == dbids, one << at.astype(np.uint64), np.uint64(0))
        yield rows, (one << (slot[rows] - start).astype(np.uint64))[:, None], db_words[:, None]


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
    load_seconds: float = 0.0  # reading and checking the files (`evaluate_files`); `seconds` is the evaluation

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
    qw, dw = words(qp), words(dp)
    hist = np.empty((len(qp), k + 1, 2), np.int64)
    ap, found = np.empty(len(qp)), np.empty(len(qp), np.int64)
    at_grid = np.empty((len(qp), len(grid)), np.int64)
    for rows, qlw, dlw in _label_words(qlab, dblab):
        qw_rows = np.ascontiguousarray(qw[rows])
        hist[rows], ap[rows], found[rows], at_grid[rows] = ranking.index_order(qw_rows, dw, qlw, dlw, k, topk or 0, grid)
    tie_mean, tie_best, tie_worst = ranking.tie_aware_ap(hist)
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
    zeros_as: int | None = None,
    allow_mixed_models: bool = False,
) -> Evaluation:
    """`dsah-rt eval`: `evaluate` on codes and labels files (`zeros_as` as for `read_codes`).

    Codes whose manifests name different models are refused unless `allow_mixed_models`.
    """
    start = time.perf_counter()
    q = read_codes(query_codes, bits, zeros_as=zeros_as)
    d = read_codes(db_codes, bits, zeros_as=zeros_as)
    if q.bits != d.bits:
        raise CodesError(f"{query_codes} has {q.bits}-bit codes but {db_codes} has {d.bits}-bit codes")
    check_same_model({str(query_codes): q.fingerprint, str(db_codes): d.fingerprint}, allow_mixed_models)
    ql = read_labels(query_labels, rows=len(q))
    dl = read_labels(db_labels, rows=len(d))
    loaded = time.perf_counter() - start
    result = evaluate(q.packed, d.packed, ql, dl, bits=q.bits, topk=topk, radius=radius)
    return dataclasses.replace(result, load_seconds=loaded)
