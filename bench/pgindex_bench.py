"""The served index (PostgreSQL + pgvector, embedded) against our brute force: load rate, latency, recall.

    python -m dsah_rt.bench.pgindex_bench [--n 100000] [--bits 64] [--queries 100] [--json OUT]

Clustered codes (prototypes with bit-flip noise, the shape of learned codes) are loaded into a fresh
embedded server, already started (COPY, one transaction), once without and once with an HNSW index (its build time is
the difference). Queries come from the same distribution, k = 10. Latency is per query, one statement
each over one open connection (p50/p99); `batch` is all queries in one statement. Exact must equal
BinaryIndex to the last index; HNSW recall@k is by distance (a hit counts when its distance is at most
the exact k-th one, so any of several tied codes does).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.atomic import check_parent, write_json
from dsah_rt.bench.timing import load as load_average
from dsah_rt.bench.timing import machine, summarize
from dsah_rt.codes import Codes, pack
from dsah_rt.index import build_index
from dsah_rt.pgindex import ServedIndex, connect, load


def clustered(rng: np.random.Generator, n: int, bits: int, protos: np.ndarray, flip: float = 0.08) -> np.ndarray:
    base = protos[rng.integers(0, len(protos), n)]
    return pack(base ^ (rng.random((n, bits)) < flip).astype(np.uint8))


def recall_by_distance(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the k slots holding a code no farther than the exact k-th neighbour."""
    return float((found <= exact[:, -1:]).mean())


def _latency(index: ServedIndex, queries: np.ndarray, k: int, ef_search: int | None) -> dict[str, Any]:
    per_query = []
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[i : i + 1], k, ef_search)
        per_query.append(time.perf_counter() - start)
    start = time.perf_counter()
    distances, indices = index.search(queries, k, ef_search)
    batch = time.perf_counter() - start
    return {"per_query_ms": summarize(np.asarray(per_query)), "batch_s": batch, "distances": distances, "indices": indices}


@click.command()
@click.option("--n", type=int, default=100_000, show_default=True)
@click.option("--bits", type=int, default=64, show_default=True)
@click.option("--queries", type=int, default=100, show_default=True)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--ef-search", "ef_values", type=int, multiple=True, default=(10, 40, 100, 200), show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def main(n: int, bits: int, queries: int, k: int, ef_values: tuple[int, ...], json_out: str | None) -> None:
    check_parent(json_out)
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 2, (64, bits), dtype=np.uint8)
    db, q = clustered(rng, n, bits, protos), clustered(rng, queries, bits, protos)
    reference = build_index(db, "exact", bits)
    reference.search(q[:1], k)  # compiles the kernels
    start = time.perf_counter()
    ref_d, ref_i = reference.search(q, k)
    ours_s = time.perf_counter() - start
    report: dict[str, Any] = {"n": n, "bits": bits, "queries": queries, "k": k, "machine": machine(), "load_before": load_average()}
    report["binary_index_batch_s"] = ours_s
    with tempfile.TemporaryDirectory() as folder:
        dsn = f"embedded:{Path(folder) / 'pg'}"
        connect(dsn).close()  # initdb and the server's start stay out of the load time
        plain = load(Codes(db, bits), dsn, "bench_plain")
        hnsw = load(Codes(db, bits), dsn, "bench_hnsw", hnsw=True)
        report["load"] = {"seconds": plain.seconds, "codes_per_s": n / plain.seconds, "with_hnsw_seconds": hnsw.seconds}
        with ServedIndex(dsn, "bench_plain") as index:
            exact = _latency(index, q, k, None)
        assert (exact.pop("indices") == ref_i).all() and (exact.pop("distances") == ref_d).all(), "exact != BinaryIndex"
        report["exact"] = exact
        report["hnsw"] = {}
        with ServedIndex(dsn, "bench_hnsw") as index:
            for ef in ef_values:
                run = _latency(index, q, k, ef)
                run["recall_at_k"] = recall_by_distance(run.pop("distances"), ref_d)
                run.pop("indices")
                report["hnsw"][str(ef)] = run
    report["load_after"] = load_average()
    click.echo(
        f"{n} x {bits}-bit: load {report['load']['codes_per_s']:,.0f} codes/s ({plain.seconds:.2f} s; with HNSW "
        f"{hnsw.seconds:.2f} s); exact p50 {exact['per_query_ms']['median']:.2f} ms, batch of {queries} "
        f"{exact['batch_s']:.3f} s (BinaryIndex {ours_s:.4f} s)"
    )
    for ef, run in report["hnsw"].items():
        click.echo(f"  HNSW ef_search={ef}: p50 {run['per_query_ms']['median']:.2f} ms, p99 {run['per_query_ms']['p99']:.2f} ms, recall@{k} {run['recall_at_k']:.3f}")
    click.echo(f"load average before/after: {report['load_before']} / {report['load_after']}")
    if json_out:
        write_json(json_out, report)


if __name__ == "__main__":
    main()
