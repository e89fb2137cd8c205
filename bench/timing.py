"""Timing helpers shared by the benchmarks, with trtexec's conventions.

`measure` warms up for a time (not a count), then runs until both a minimum duration and a
minimum iteration count are reached, and keeps every per-iteration time. `summarize` reports
min / mean / median / p90 / p95 / p99 / max; percentiles are `numpy.percentile(method="inverted_cdf")`,
the nearest rank (the ceil(p/100 * n)-th smallest sample, never interpolated), so every reported
latency is one that really happened.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

PERCENTILES = (90, 95, 99)
# A step returns its own phase times in seconds (e.g. CUDA events: h2d, compute, d2h) or None,
# in which case its wall time is the only phase, "total".
Step = Callable[[], "dict[str, float] | None"]


def load() -> list[float]:
    """The 1/5/15-minute load average: other processes share the cores, so every report says so."""
    return [round(x, 2) for x in os.getloadavg()]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(step: Step, warmup_ms: float, duration_s: float, min_iters: int) -> dict[str, np.ndarray]:
    """Per-iteration times (seconds) of `step` by phase, always with "total" (the wall time)."""
    end = time.perf_counter() + warmup_ms / 1e3
    while True:  # at least one warm-up call: the first one allocates, compiles or captures
        step()
        if time.perf_counter() >= end:
            break
    phases: dict[str, list[float]] = {}
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        parts = step() or {}
        wall = time.perf_counter() - t0
        for name, value in {**parts, "total": parts.get("total", wall)}.items():
            phases.setdefault(name, []).append(value)
        if len(phases["total"]) >= min_iters and time.perf_counter() - start >= duration_s:
            break
    return {name: np.asarray(values) for name, values in phases.items()}


def nearest_rank(values: np.ndarray, p: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
    """The p-th percentile(s) of `values` as samples, never interpolated (in any order)."""
    return np.percentile(np.asarray(values, dtype=np.float64), p, method="inverted_cdf")


def summarize(samples: np.ndarray, unit: float = 1e3) -> dict[str, float]:
    """Latency statistics of `samples` (seconds), scaled by `unit` (default: milliseconds)."""
    s = np.asarray(samples, dtype=np.float64) * unit
    median, *tail = nearest_rank(s, [50, *PERCENTILES]).tolist()
    out = {"n": int(len(s)), "min": float(s.min()), "mean": float(s.mean()), "median": median}
    out.update({f"p{p}": value for p, value in zip(PERCENTILES, tail)})
    out["max"] = float(s.max())
    return out


def quantiles(samples: np.ndarray, points: int = 101, unit: float = 1e3) -> list[float]:
    """The distribution in `points` nearest-rank quantiles (0..100%): enough to plot it, small in JSON."""
    s = np.asarray(samples, dtype=np.float64) * unit
    return [round(q, 5) for q in nearest_rank(s, np.linspace(0, 100, points)).tolist()]


def machine() -> dict[str, object]:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
