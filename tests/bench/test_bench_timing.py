"""The trtexec-style timing helpers: nearest-rank percentiles (numpy's inverted_cdf) and the stop rule."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dsah_rt.bench.timing import measure, nearest_rank, quantiles, summarize


def test_nearest_rank_is_a_sample_never_interpolated():
    values = np.arange(1, 11, dtype=float)  # 1..10
    assert nearest_rank(values, 50) == 5.0  # ceil(0.5 * 10) = 5th smallest
    assert nearest_rank(values, 90) == 9.0
    assert nearest_rank(values, 99) == 10.0
    assert nearest_rank(values, 0) == 1.0


def hand_nearest_rank(values: np.ndarray, p: float) -> float:
    """The definition written out: the ceil(p/100 n)-th smallest value (the first for p = 0)."""
    ordered = sorted(values.tolist())
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 100, 101, 1000])
def test_nearest_rank_equals_the_definition(n):
    values = np.random.default_rng(n).exponential(size=n)
    points = [0, 1, 5, 10, 25, 33.3, 50, 66.7, 90, 95, 99, 99.9, 100, *np.linspace(0, 100, 101).tolist()]
    for p in points:
        assert nearest_rank(values, p) == hand_nearest_rank(values, p), (n, p)
    stats = summarize(values, unit=1.0)
    assert [stats[k] for k in ("median", "p90", "p95", "p99")] == [hand_nearest_rank(values, p) for p in (50, 90, 95, 99)]
    assert quantiles(values, unit=1.0) == [round(hand_nearest_rank(values, p), 5) for p in np.linspace(0, 100, 101)]


def test_summarize_in_milliseconds():
    stats = summarize(np.array([0.003, 0.001, 0.002]))
    assert stats["n"] == 3
    assert (stats["min"], stats["median"], stats["max"]) == (1.0, 2.0, 3.0)
    assert abs(stats["mean"] - 2.0) < 1e-9
    assert set(stats) == {"n", "min", "mean", "median", "p90", "p95", "p99", "max"}
    assert len(quantiles(np.array([0.001, 0.002]), points=11)) == 11


def test_measure_meets_both_minimum_duration_and_iterations():
    calls = []
    phases = measure(lambda: calls.append(1), warmup_ms=1, duration_s=0.0, min_iters=7)
    assert len(phases["total"]) == 7
    assert len(calls) >= 8  # at least one warm-up call that is not timed

    phases = measure(lambda: time.sleep(0.002), warmup_ms=0, duration_s=0.03, min_iters=1)
    assert phases["total"].sum() >= 0.03 * 0.9


def test_measure_keeps_the_phases_a_step_reports():
    phases = measure(lambda: {"h2d": 1.0, "compute": 2.0, "d2h": 3.0, "total": 6.0}, 0, 0, 3)
    assert set(phases) == {"h2d", "compute", "d2h", "total"}
    assert phases["total"].tolist() == [6.0, 6.0, 6.0]
