"""evaluate() against per-query references, and against the deep-hashing codebases' NumPy MAP."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import code_sets
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from dsah_rt.bench.reference import numpy_map
from dsah_rt.codes import pack
from dsah_rt.errors import CodesError
from dsah_rt.metrics import evaluate


@given(code_sets(max_db=80), st.sampled_from([0, 1, 5, 40]), st.integers(0, 3))
def test_evaluate_matches_references(case, topk, radius):
    k, q01, db01, qlab, dblab = case
    radius = min(radius, k)
    res = evaluate(pack(q01), pack(db01), qlab, dblab, bits=k, topk=topk, radius=radius)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    ranked = [rel[i][ref.ranking(dist[i])] for i in range(len(q01))]
    ref.assert_close(res.map, np.mean([ref.average_precision(r, topk or None) for r in ranked]))
    ref.assert_close(res.map_tie_aware, np.mean([ref.tie_aware_formula(dist[i], rel[i]) for i in range(len(q01))]), 1e-10)
    ref.assert_close(res.precision_at_radius, np.mean([ref.precision_within(dist[i], rel[i], radius) for i in range(len(q01))]))
    no_rel = [not r[: topk or None].any() for r in ranked]
    assert res.queries_without_relevant == sum(no_rel)
    for kk, p in zip(res.precision_at_k["k"], res.precision_at_k["precision"]):
        ref.assert_close(p, np.mean([ref.precision_at(r, kk) for r in ranked]))
    assert res.queries == len(q01) and res.database == len(db01) and res.bits == k


def test_codebase_numpy_map_agrees_with_stable_sort_and_shows_the_known_defects():
    rng = np.random.default_rng(7)
    k, nq, ndb = 12, 40, 900  # 12 bits: many ties, so sort stability matters
    q01 = rng.integers(0, 2, (nq, k), dtype=np.uint8)
    db01 = rng.integers(0, 2, (ndb, k), dtype=np.uint8)
    qlab, dblab = rng.integers(0, 5, nq), rng.integers(0, 5, ndb)
    onehot = np.eye(5)
    q_pm1, db_pm1 = q01 * 2.0 - 1, db01 * 2.0 - 1
    ours = evaluate(pack(q01), pack(db01), qlab, dblab, bits=k).map
    stable = numpy_map(q_pm1, db_pm1, onehot[qlab], onehot[dblab], kind="stable")
    assert abs(ours - stable) <= 1e-12
    # The codebases' quicksort orders ties arbitrarily; topk=-1 slicing drops the last item.
    quick = numpy_map(q_pm1, db_pm1, onehot[qlab], onehot[dblab], kind="quicksort")
    dropped = numpy_map(q_pm1, db_pm1, onehot[qlab], onehot[dblab], kind="stable", topk=-1)
    assert quick != stable or dropped != stable
    ours_top = evaluate(pack(q01), pack(db01), qlab, dblab, bits=k, topk=100).map
    assert abs(ours_top - numpy_map(q_pm1, db_pm1, onehot[qlab], onehot[dblab], kind="stable", topk=100)) <= 1e-12


def test_query_without_relevant_item_counts_as_zero():
    q01 = np.zeros((2, 8), np.uint8)
    db01 = np.zeros((3, 8), np.uint8)
    res = evaluate(pack(q01), pack(db01), np.array([0, 9]), np.array([0, 1, 0]), bits=8)
    assert res.queries_without_relevant == 1
    ref.assert_close(res.map, (np.mean([1, 2 / 3]) + 0.0) / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"db_codes": np.zeros((3, 2), np.uint8)}, "need 1"),
        ({"query_labels": np.array([0, 1, 2])}, "3 rows but the codes have 2"),
        ({"db_labels": np.zeros((3, 4), np.uint8)}, "different kinds"),
        ({"topk": -3}, "--topk"),
        ({"radius": 9}, "radius"),
    ],
)
def test_bad_inputs(kwargs, message):
    args = {"query_codes": np.zeros((2, 1), np.uint8), "db_codes": np.zeros((3, 1), np.uint8),
            "query_labels": np.array([0, 1]), "db_labels": np.array([0, 1, 1]), "bits": 8}
    args.update(kwargs)
    if "db_codes" in kwargs:
        args["bits"] = None
    with pytest.raises(CodesError, match=message):
        evaluate(**args)
