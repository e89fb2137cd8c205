"""Retrieval benchmark: our Numba kernels against the NumPy deep-hashing MAP and faiss-cpu search.

    python -m dsah_rt.bench.retrieval [--quick] [--threads 2] [--json OUT] [--md OUT]

Every ratio is measured in one run on the same data. Results are checked for equality with the anchor
(MAP to 1e-12 against the NumPy code with a stable sort; identical top-k distance lists against FAISS).
The machine's own limits (popcount, histogram update, memory bandwidth) are measured alongside so the
headroom is visible.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

import click
import numba
import numpy as np
from numba import njit, prange

from dsah_rt import hamming
from dsah_rt.atomic import write_report
from dsah_rt.bench.reference import numpy_map, numpy_tie_aware_map
from dsah_rt.bench.timing import machine
from dsah_rt.codes import pack
from dsah_rt.index import BinaryIndex


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Minimum wall time over `repeat` runs (after one warm-up that also compiles)."""
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def labelled_codes(nq: int, ndb: int, bits: int, classes: int, seed: int = 0):
    """Codes near one prototype per class (15% of bits flipped): a realistic MAP, many ties."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 2, (classes, bits), dtype=np.uint8)

    def draw(n):
        lab = rng.integers(0, classes, n)
        return protos[lab] ^ (rng.random((n, bits)) < 0.15).astype(np.uint8), lab

    (q01, ql), (db01, dl) = draw(nq), draw(ndb)
    return q01, db01, ql, dl


# --- the machine's limits ---------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _popcount_rate(qw, dbw):
    total = 0
    for i in prange(qw.shape[0]):
        q = qw[i, 0]
        acc = 0
        for j in range(dbw.shape[0]):
            acc += hamming._popcount(q ^ dbw[j, 0])
        total += acc
    return total


@njit(parallel=True, cache=True)
def _histogram_rate(values, reps):
    out = np.zeros(reps, np.int64)
    for r in prange(reps):
        hist = np.zeros(65, np.int32)
        for j in range(values.shape[0]):
            hist[values[j]] += 1
        out[r] = hist[r % 65]
    return out


@njit(parallel=True, cache=True)
def _read_bandwidth(big):
    total = np.uint64(0)
    for i in prange(big.shape[0]):
        total += big[i]
    return total


def machine_limits(n: int = 1_000_000) -> dict[str, float]:
    rng = np.random.default_rng(0)
    dbw = rng.integers(0, 2**63, (n, 1), dtype=np.uint64)
    qw = rng.integers(0, 2**63, (64, 1), dtype=np.uint64)
    t_pop, _ = best_of(lambda: _popcount_rate(qw, dbw))
    values = rng.integers(20, 45, n).astype(np.int64)  # distances of random 64-bit codes cluster
    t_hist, _ = best_of(lambda: _histogram_rate(values, 64))
    big = np.ones(2**26, np.uint64)  # 512 MiB
    t_mem, _ = best_of(lambda: _read_bandwidth(big))
    return {
        "popcount_pairs_per_s": 64 * n / t_pop,
        "histogram_updates_per_s": 64 * n / t_hist,
        "memory_read_gb_per_s": big.nbytes / t_mem / 1e9,
    }


# --- MAP ----------------------------------------------------------------------------------------


def bench_map(nq: int, ndb: int, bits: int, classes: int, numpy_queries: int) -> dict[str, Any]:
    """Ours on all queries; the NumPy codebase MAP on the first `numpy_queries` (it is O(N log N)
    per query and independent across queries, so its per-query time extrapolates exactly)."""
    q01, db01, ql, dl = labelled_codes(nq, ndb, bits, classes)
    qw, dw = hamming.words(pack(q01)), hamming.words(pack(db01))
    qlw, dlw = hamming.label_words(ql, dl)
    grid = np.zeros(0, np.int64)

    def index_order():
        hist = hamming.relevance_histograms(qw, dw, qlw, dlw, bits)
        return hamming.index_order_ap(qw, dw, qlw, dlw, hist, 0, grid)[0]

    def tie_aware():
        return hamming.tie_aware_ap(hamming.relevance_histograms(qw, dw, qlw, dlw, bits))[0]

    t_ours, ap = best_of(index_order)
    t_tie, tie = best_of(tie_aware)
    m = numpy_queries
    onehot = np.eye(classes)
    q_pm1, db_pm1 = q01[:m] * 2.0 - 1, db01 * 2.0 - 1
    t_np, np_map = best_of(lambda: numpy_map(q_pm1, db_pm1, onehot[ql[:m]], onehot[dl]), repeat=1)
    stable = numpy_map(q_pm1, db_pm1, onehot[ql[:m]], onehot[dl], kind="stable")
    np_tie = numpy_tie_aware_map(q_pm1, db_pm1, onehot[ql[:m]], onehot[dl])
    per_query_np = t_np / m
    return {
        "queries": nq, "database": ndb, "bits": bits, "classes": classes, "numpy_queries_timed": m,
        "map": float(ap.mean()), "map_tie_aware": float(tie.mean()),
        "numpy_map_quicksort_on_subset": np_map,
        "ours_seconds": t_ours, "ours_tie_aware_seconds": t_tie,
        "numpy_seconds_extrapolated": per_query_np * nq,
        "speedup_index_order": per_query_np * nq / t_ours,
        "speedup_tie_aware": per_query_np * nq / t_tie,
        "max_abs_diff_vs_numpy_stable": float(abs(ap[:m].mean() - stable)),
        "max_abs_diff_tie_aware_vs_numpy": float(abs(tie[:m].mean() - np_tie)),
        "pairs_per_s_index_order": nq * ndb / t_ours,
        "pairs_per_s_tie_aware": nq * ndb / t_tie,
    }


# --- top-k against FAISS ------------------------------------------------------------------------


def bench_topk(nq: int, ndb: int, bits: int, ks: list[int], threads: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(bits)
    db = pack(rng.integers(0, 2, (ndb, bits), dtype=np.uint8))
    q = pack(rng.integers(0, 2, (nq, bits), dtype=np.uint8))
    index = BinaryIndex(bits)
    index.add(db)
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        findex = faiss.IndexBinaryFlat(bits)
        findex.add(db)
    rows = []
    for k in ks:
        t_ours, (D, I) = best_of(lambda: index.search(q, k))
        row = {"bits": bits, "k": k, "queries": nq, "database": ndb, "ours_seconds": t_ours,
               "ours_codes_per_s": nq * ndb / t_ours}
        # Our indices must point at codes at the reported distance (ties are ordered by index).
        sample = I[:, ::max(1, k // 10)]
        recomputed = np.unpackbits(q[:, None, :] ^ db[sample], axis=2).sum(axis=2)
        row["indices_consistent"] = bool((recomputed == D[:, ::max(1, k // 10)]).all())
        if faiss is not None:
            t_faiss, (FD, _) = best_of(lambda: findex.search(q, k))
            row.update({"faiss_seconds": t_faiss, "faiss_codes_per_s": nq * ndb / t_faiss,
                        "speedup_vs_faiss": t_faiss / t_ours, "distances_identical": bool((FD == D).all())})
        rows.append(row)
    return rows


def _markdown(report: dict[str, Any]) -> str:
    lim = report["limits"]
    lines = [
        f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['threads']} threads), "
        f"numpy {report['versions']['numpy']}, numba {report['versions']['numba']}, faiss {report['versions']['faiss']}.",
        "",
        f"Machine limits: popcount {lim['popcount_pairs_per_s'] / 1e9:.2f} G pairs/s, histogram update "
        f"{lim['histogram_updates_per_s'] / 1e9:.2f} G/s, memory read {lim['memory_read_gb_per_s']:.1f} GB/s.",
        "",
        "| MAP@all | queries x database | bits | ours (s) | tie-aware (s) | NumPy codebase (s) | speed-up | tie-aware speed-up | pairs/s (ours) | |MAP - NumPy stable| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["map"]:
        lines.append(
            f"| | {r['queries']:,} x {r['database']:,} | {r['bits']} | {r['ours_seconds']:.3f} | {r['ours_tie_aware_seconds']:.3f} "
            f"| {r['numpy_seconds_extrapolated']:.1f} | {r['speedup_index_order']:.0f}x | {r['speedup_tie_aware']:.0f}x "
            f"| {r['pairs_per_s_index_order'] / 1e9:.2f} G | {r['max_abs_diff_vs_numpy_stable']:.1e} |"
        )
    lines += ["", "| top-k | bits | k | ours (s) | faiss-cpu (s) | speed-up | ours codes/s | distances identical |", "|---|---|---|---|---|---|---|---|"]
    for r in report["topk"]:
        lines.append(
            f"| | {r['bits']} | {r['k']} | {r['ours_seconds']:.3f} | {r.get('faiss_seconds', float('nan')):.3f} "
            f"| {r.get('speedup_vs_faiss', float('nan')):.2f}x | {r['ours_codes_per_s'] / 1e9:.2f} G | {r.get('distances_identical')} |"
        )
    return "\n".join(lines) + "\n"


def run_benchmark(quick: bool, threads: int) -> dict[str, Any]:
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    threads = hamming.set_threads(threads)
    big = 100_000 if quick else 1_000_000
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": machine()["cpu"], "threads": threads, "cores": numba.config.NUMBA_NUM_THREADS},
        "versions": {"numpy": np.__version__, "numba": numba.__version__, "faiss": faiss_version},
        "quick": quick,
    }
    report["limits"] = machine_limits(big)
    report["map"] = [
        bench_map(1000, 59_000, 48, 10, numpy_queries=100 if quick else 1000),
        bench_map(1000, big, 48, 10, numpy_queries=10 if quick else 40),
    ]
    report["topk"] = [row for bits in (32, 48, 64) for row in bench_topk(1000, big, bits, [10, 100, 1000], threads)]
    return report


@click.command()
@click.option("--quick", is_flag=True, help="100k database instead of 1M, fewer NumPy queries.")
@click.option("--threads", default=2, show_default=True, help="Threads for ours and for FAISS.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--md", "md_out", type=click.Path(dir_okay=False), help="Write the tables as markdown.")
def main(quick: bool, threads: int, json_out: str | None, md_out: str | None) -> None:
    """Run the retrieval benchmark and print its tables."""
    report = run_benchmark(quick, threads)
    text = _markdown(report)
    click.echo(text)
    write_report(report, text, json_out, md_out)


if __name__ == "__main__":
    main()
