"""The served index (PostgreSQL + pgvector, embedded) against our brute force and faiss-cpu: load rate, latency under concurrency, recall.

    python -m dsah_rt.bench.pgindex_bench [--n 100000] [--bits 64] [--queries 100] [--clients 1,8]
        [--ef-search 10 --ef-search 40 ...] [--json OUT]

Issue 11's run is `--n 1000000 --bits 64` (the defaults otherwise): load time, exact and HNSW latency
p50/p99 at k = 10 under 1 and 8 concurrent clients, HNSW recall@10 at several ef_search, next to
BinaryIndex and faiss-cpu on the same data.

Clustered codes (prototypes with bit-flip noise, the shape of learned codes) are loaded into a fresh
embedded server, already started (COPY, one transaction), once without and once with an HNSW index (its build time is
the difference). Queries come from the same distribution, k = 10.

Served index, for exact and for each ef_search:
- `per_query_ms`: one statement per query, in turn, over one open connection; `batch_s`: all queries
  in one statement.
- `clients[C]`, for each C in --clients: C threads at once, each with its own connection (opened, and
  warmed by one query, before the clock starts; psycopg connections are never shared between threads),
  the queries dealt round-robin among them, one statement per query. `per_query_ms` is the latency of
  every query (p50/p99 among the rest), `queries_per_s` all queries over the wall time of the whole run
  (from the moment every thread is ready to the last one's end).
Exact must equal BinaryIndex to the last index and distance, alone and under every client count; HNSW
recall@k is by distance (a hit counts when its distance is at most the exact k-th one, so any of
several tied codes does), measured again under every client count.

In process, on the same packed codes: BinaryIndex (all cores) and faiss-cpu `IndexBinaryFlat`
(omp_set_num_threads(cores); packed bytes as they are: Hamming distance does not depend on bit order),
each timed for all queries in one call (`batch_s`) and one query per call after a warm-up call
(`per_query_ms`). faiss's distances are checked against BinaryIndex's (its ties may order indices
otherwise). Without faiss, `faiss` is null and `faiss_error` says why. Latencies are in ms; the load
average before and after is recorded, since other processes share the cores.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt import native
from dsah_rt.atomic import check_parent, write_json
from dsah_rt.bench.timing import load as load_average
from dsah_rt.bench.timing import machine, summarize
from dsah_rt.codes import Codes, pack
from dsah_rt.index import build_index
from dsah_rt.pgindex import ServedIndex, connect, load

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def clustered(rng: np.random.Generator, n: int, bits: int, protos: np.ndarray, flip: float = 0.08) -> np.ndarray:
    base = protos[rng.integers(0, len(protos), n)]
    return pack(base ^ (rng.random((n, bits)) < flip).astype(np.uint8))


def recall_by_distance(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the k slots holding a code no farther than the exact k-th neighbour."""
    return float((found <= exact[:, -1:]).mean())


def parse_clients(_ctx: object, _param: object, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated client counts, e.g. 1,8") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r}: every client count must be at least 1")
    return tuple(dict.fromkeys(counts))


def _one_by_one(search: Search, queries: np.ndarray, k: int) -> list[float]:
    """Seconds of each query searched alone, in turn."""
    times = []
    for i in range(len(queries)):
        start = time.perf_counter()
        search(queries[i : i + 1], k)
        times.append(time.perf_counter() - start)
    return times


def _batch(search: Search, queries: np.ndarray, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    start = time.perf_counter()
    distances, indices = search(queries, k)
    return time.perf_counter() - start, distances, indices


def _latency(search: Search, queries: np.ndarray, k: int) -> dict[str, Any]:
    """One query per call, then all in one call: per-query ms, batch seconds and the batch's results."""
    per_query = _one_by_one(search, queries, k)
    batch, distances, indices = _batch(search, queries, k)
    return {"per_query_ms": summarize(np.asarray(per_query)), "batch_s": batch, "distances": distances, "indices": indices}


def _served(index: ServedIndex, ef_search: int | None) -> Search:
    return lambda queries, k: index.search(queries, k, ef_search)


def _concurrent(dsn: str, table: str, queries: np.ndarray, k: int, ef_search: int | None, clients: int) -> dict[str, Any]:
    """`clients` threads, each with its own connection, the queries dealt round-robin, started together."""
    nq = len(queries)
    distances = np.empty((nq, k), dtype=np.int32)
    indices = np.empty((nq, k), dtype=np.int64)
    times = np.empty(nq)
    errors: list[BaseException] = []
    started: list[float] = []
    # Opened here, one after another (the embedded server's start is not for threads to race); each
    # is then used by its own thread alone.
    indexes: list[ServedIndex] = []
    ready = threading.Barrier(clients, action=lambda: started.append(time.perf_counter()))

    def client(index: ServedIndex, mine: np.ndarray) -> None:
        search = _served(index, ef_search)
        try:
            search(queries[:1], k)  # warm-up: the backend's first statement loads catalogs and plans
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        try:
            for i in mine:
                start = time.perf_counter()
                distances[i : i + 1], indices[i : i + 1] = search(queries[i : i + 1], k)
                times[i] = time.perf_counter() - start
        except BaseException as exc:
            errors.append(exc)

    try:
        indexes.extend(ServedIndex(dsn, table) for _ in range(clients))
        threads = [threading.Thread(target=client, args=(index, np.arange(t, nq, clients))) for t, index in enumerate(indexes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started[0] if started else float("nan")
    finally:
        for index in indexes:
            index.close()
    if errors:
        raise errors[0]
    return {"per_query_ms": summarize(times), "queries_per_s": nq / wall, "wall_s": wall, "distances": distances, "indices": indices}


def _served_runs(
    dsn: str, table: str, queries: np.ndarray, k: int, ef_search: int | None, clients: tuple[int, ...],
    judge: Callable[[np.ndarray, np.ndarray, str], dict[str, Any]],
) -> dict[str, Any]:
    """Exact (`ef_search` None) or HNSW on `table`: alone, in one batch, then under each client count.

    `judge(distances, indices, what)` checks or scores each run's results; what it returns joins the run.
    """
    with ServedIndex(dsn, table) as index:
        run = _latency(_served(index, ef_search), queries, k)
    run.update(judge(run.pop("distances"), run.pop("indices"), "alone"))
    run["clients"] = {}
    for count in clients:
        sub = _concurrent(dsn, table, queries, k, ef_search, count)
        sub.update(judge(sub.pop("distances"), sub.pop("indices"), f"{count} clients"))
        run["clients"][str(count)] = sub
    return run


def _faiss(db: np.ndarray, queries: np.ndarray, k: int, ref_d: np.ndarray, threads: int) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = faiss.IndexBinaryFlat(8 * db.shape[1])  # whole bytes: padding bits are zero in both
    index.add(db)
    build = time.perf_counter() - start
    index.search(queries[:1], k)  # warm-up
    run = _latency(index.search, queries, k)
    run.pop("indices")
    identical = bool((run.pop("distances") == ref_d).all())
    return {"version": faiss.__version__, "threads": threads, "build_s": build, **run, "distances_identical": identical}


def _line(label: str, run: dict[str, Any], extra: str = "") -> str:
    ms = run["per_query_ms"]
    rate = f", {run['queries_per_s']:,.0f} queries/s" if "queries_per_s" in run else ""
    return f"  {label:<28} p50 {ms['median']:8.2f} ms, p99 {ms['p99']:8.2f} ms{rate}{extra}"


@click.command()
@click.option("--n", type=int, default=100_000, show_default=True)
@click.option("--bits", type=int, default=64, show_default=True)
@click.option("--queries", type=int, default=100, show_default=True)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--ef-search", "ef_values", type=int, multiple=True, default=(10, 40, 100, 200), show_default=True)
@click.option("--clients", type=str, default="1,8", show_default=True, callback=parse_clients,
              help="Concurrent client counts, comma-separated: each client is a thread with its own connection.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
def main(n: int, bits: int, queries: int, k: int, ef_values: tuple[int, ...], clients: tuple[int, ...], json_out: str | None) -> None:
    check_parent(json_out)
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 2, (64, bits), dtype=np.uint8)
    db, q = clustered(rng, n, bits, protos), clustered(rng, queries, bits, protos)
    cores = os.cpu_count() or 1
    reference = build_index(db, "exact", bits)
    reference.search(q[:1], k)  # compiles the kernels
    ours = _latency(reference.search, q, k)
    ref_d, ref_i = ours.pop("distances"), ours.pop("indices")
    report: dict[str, Any] = {"n": n, "bits": bits, "queries": queries, "k": k, "clients": list(clients), "machine": machine(), "load_before": load_average()}
    report["binary_index_batch_s"] = ours["batch_s"]
    report["binary_index"] = {"threads": native.set_threads(None), **ours}
    try:
        report["faiss"] = _faiss(db, q, k, ref_d, cores)
    except ImportError as exc:
        report["faiss"], report["faiss_error"] = None, f"faiss-cpu not importable: {exc}"

    def exact_judge(distances: np.ndarray, indices: np.ndarray, what: str) -> dict[str, Any]:
        assert (indices == ref_i).all() and (distances == ref_d).all(), f"exact ({what}) != BinaryIndex"
        return {}

    def hnsw_judge(distances: np.ndarray, _indices: np.ndarray, _what: str) -> dict[str, Any]:
        return {"recall_at_k": recall_by_distance(distances, ref_d)}

    with tempfile.TemporaryDirectory() as folder:
        dsn = f"embedded:{Path(folder) / 'pg'}"
        connect(dsn).close()  # initdb and the server's start stay out of the load time
        plain = load(Codes(db, bits), dsn, "bench_plain")
        hnsw = load(Codes(db, bits), dsn, "bench_hnsw", hnsw=True)
        report["load"] = {"seconds": plain.seconds, "codes_per_s": n / plain.seconds, "with_hnsw_seconds": hnsw.seconds}
        report["exact"] = exact = _served_runs(dsn, "bench_plain", q, k, None, clients, exact_judge)
        report["hnsw"] = {str(ef): _served_runs(dsn, "bench_hnsw", q, k, ef, clients, hnsw_judge) for ef in ef_values}
    report["load_after"] = load_average()
    click.echo(
        f"{n} x {bits}-bit: load {report['load']['codes_per_s']:,.0f} codes/s ({plain.seconds:.2f} s; with HNSW "
        f"{hnsw.seconds:.2f} s); exact p50 {exact['per_query_ms']['median']:.2f} ms, batch of {queries} "
        f"{exact['batch_s']:.3f} s (BinaryIndex {ours['batch_s']:.4f} s)"
    )
    for count, run in exact["clients"].items():
        click.echo(_line(f"exact, {count} clients", run))
    for ef, run in report["hnsw"].items():
        click.echo(_line(f"HNSW ef_search={ef}, alone", run, f", batch {run['batch_s']:.3f} s, recall@{k} {run['recall_at_k']:.3f}"))
        for count, sub in run["clients"].items():
            click.echo(_line(f"HNSW ef_search={ef}, {count} clients", sub, f", recall@{k} {sub['recall_at_k']:.3f}"))
    click.echo(_line(f"BinaryIndex ({report['binary_index']['threads']} threads)", ours, f", batch {ours['batch_s']:.4f} s"))
    if report["faiss"] is None:
        click.echo(f"  faiss: {report['faiss_error']}")
    else:
        f = report["faiss"]
        same = "identical" if f["distances_identical"] else "DIFFERENT"
        click.echo(_line(f"faiss {f['version']} ({f['threads']} threads)", f, f", batch {f['batch_s']:.4f} s, distances {same}"))
    click.echo(f"load average before/after: {report['load_before']} / {report['load_after']}")
    if json_out:
        write_json(json_out, report)


if __name__ == "__main__":
    main()
