"""Multi-index hashing at scale against our brute force and FAISS: build and search time, memory, exactness.

    python -m dsah_rt.bench.mih_bench [--n 10000000] [--bits 32 --bits 64] [--threads 2] [--json OUT]

Two databases per code length: uniform codes, the hardest case for MIH (the k-th neighbour is far), and
clustered ones (prototypes with bit-flip noise, the shape of learned codes). Queries (1000) come from the
same distribution, not from the database; k = 10. Each method runs in its own spawned process, so its
peak RSS is its own: our MIH (default, and probing alone: scan_cost = 0), our brute force (BinaryIndex),
faiss IndexBinaryFlat, and faiss IndexBinaryMultiHash and IndexBinaryHash (approximate, with tables of
about log2(N) bits and --nflip flipped bits; recall by distance, so any of several codes tied at the
k-th distance counts). MIH must equal our brute force to
the last index, FAISS Flat's distances ours. Search time is the best of --repeat runs after a small
warm-up search (loads the kernels), reported with their median (and speed-ups of medians against
medians); build time includes adding the codes and building the tables. Then our brute force and MIH
search alternately in one more process: the speed-up of each pair, and their median.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import math
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click
import numba
import numpy as np

from dsah_rt import native
from dsah_rt.atomic import check_parent, write_json
from dsah_rt.bench.backends import peak_rss_mb
from dsah_rt.bench.timing import load, machine
from dsah_rt.codes import nbytes_for, pack
from dsah_rt.index import MIHIndex, index_factory
from dsah_rt.index.mih import default_substrings

CHUNK = 1 << 18  # codes drawn per step: keeps the generator's own memory small next to the index


def draw_codes(path: Path, data: str, n: int, bits: int, seed: int, clusters: int, flip: float) -> None:
    """n packed codes into the .npy `path`: uniform, or `clusters` prototypes (fixed by bits) with each
    bit flipped with probability `flip`. Different seeds give different codes of the same distribution."""
    protos = np.random.default_rng(bits).integers(0, 2, (clusters, bits), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, nbytes_for(bits)))
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        if data == "uniform":
            out[start : start + size] = pack(rng.integers(0, 2, (size, bits), dtype=np.uint8))
        else:
            noise = rng.random((size, bits)) < flip
            out[start : start + size] = pack(protos[rng.integers(0, clusters, size)] ^ noise)
    out.flush()


Builder = Callable[[np.ndarray, int], tuple[Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], int]]


def _ours(spec: str, scan_cost: int | None = None) -> Builder:
    def build(db: np.ndarray, bits: int):
        index = index_factory(spec, bits)
        if scan_cost is not None:
            index.scan_cost = scan_cost
        index.add(db)
        nbytes = len(db) * 8 * -(-db.shape[1] // 8)  # rows padded to whole words
        if isinstance(index, MIHIndex):
            nbytes += sum(array.nbytes for array in index.tables())  # builds the tables: part of the build
        return index.search, nbytes

    return build


def _faiss(make: Callable[[Any, int, int], Any]) -> Builder:
    def build(db: np.ndarray, bits: int):
        import faiss

        index = make(faiss, bits, len(db))
        index.add(db)
        return index.search, int(faiss.serialize_index_binary(index).size)

    return build


def faiss_hash_params(bits: int, n: int) -> tuple[int, int]:
    """(tables, bits per table) for FAISS's hash indexes: the paper's substrings of about log2(n) bits
    (FAISS keeps each bucket's ids apart from the codes, so fuller buckets do not pay there)."""
    tables = max(1, round(bits / math.log2(n)))
    return tables, bits // tables


def methods(nflip: int) -> dict[str, Builder]:
    """Every method by name; FAISS's hash indexes flip up to `nflip` bits of each table's key."""

    def multihash(faiss, bits, n):
        index = faiss.IndexBinaryMultiHash(8 * nbytes_for(bits), *faiss_hash_params(bits, n))
        index.nflip = nflip
        return index

    def single_hash(faiss, bits, n):
        index = faiss.IndexBinaryHash(8 * nbytes_for(bits), faiss_hash_params(bits, n)[1])
        index.nflip = nflip
        return index

    return {
        "mih": _ours("MIH"),
        "mih (probing alone)": _ours("MIH", scan_cost=0),
        "brute force": _ours("exact"),
        "faiss Flat": _faiss(lambda faiss, bits, n: faiss.IndexBinaryFlat(8 * nbytes_for(bits))),
        "faiss MultiHash": _faiss(multihash),
        "faiss Hash": _faiss(single_hash),
    }


def measure(name: str, folder: Path, bits: int, k: int, repeat: int, threads: int, nflip: int) -> dict[str, Any]:
    """One method in this (fresh) process: build, warm up, search `repeat` times; its own memory."""
    import faiss

    native.set_threads(threads)
    faiss.omp_set_num_threads(threads)
    build = methods(nflip)[name]
    queries = np.load(folder / "q.npy")
    build(queries[:100], bits)[0](queries[:2], 1)  # compiles the kernels, off the clock
    db = np.load(folder / "db.npy")
    data_rss = peak_rss_mb()
    start = time.perf_counter()
    search, nbytes = build(db, bits)
    build_s = time.perf_counter() - start
    search(queries[:10], k)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        D, I = search(queries, k)
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    return {"method": name, "build_s": build_s, "search_s": min(times), "search_median_s": float(np.median(times)),
            "search_times_s": times, "index_mb": nbytes / 2**20,
            "peak_rss_mb": peak, "rss_over_data_mb": peak - data_rss,
            "distances": np.asarray(D, np.int32), "indices": np.asarray(I, np.int64)}  # fmt: skip


def paired(folder: Path, bits: int, k: int, repeat: int, threads: int) -> dict[str, Any]:
    """Our brute force and MIH in one (fresh) process, their searches alternating, `repeat` pairs: the
    speed-up each pair gives. Two processes can run the same search at speeds 1.2-1.3x apart on a
    shared VM, which separate processes per method put into the ratio; one process's pairs do not."""
    native.set_threads(threads)
    queries, db = np.load(folder / "q.npy"), np.load(folder / "db.npy")
    searches = {name: methods(0)[name](db, bits)[0] for name in ("brute force", "mih")}
    times: dict[str, list[float]] = {name: [] for name in searches}
    # Untimed: builds the tables, and a first search touches them (the first pair ran at 0.6-0.8x the
    # others' speed-up when it was timed); its results show the pairs time the same answers.
    first = {name: search(queries, k) for name, search in searches.items()}
    same = all(np.array_equal(a, b) for a, b in zip(first["brute force"], first["mih"]))
    for _ in range(repeat):
        for name, search in searches.items():
            start = time.perf_counter()
            search(queries, k)
            times[name].append(time.perf_counter() - start)
    speedups = [b / m for b, m in zip(times["brute force"], times["mih"])]
    return {"brute_force_times_s": times["brute force"], "mih_times_s": times["mih"], "speedups": speedups,
            "speedup_median": float(np.median(speedups)), "same_results": same}  # fmt: skip


def _isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def compare(rows: list[dict[str, Any]], k: int) -> None:
    """Each row against the brute force: exact (MIH: distances and indices; FAISS Flat: distances),
    recall by distance, and speed-ups of MIH over the brute force and FAISS Flat."""
    by_name = {row["method"]: row for row in rows}
    exact = by_name["brute force"]
    kth = exact["distances"][:, k - 1 : k]
    for row in rows:
        found = row["indices"] >= 0
        row["recall"] = float(((row["distances"] <= kth) & found).sum() / row["indices"].size)
        row["same_distances"] = bool(np.array_equal(row["distances"], exact["distances"]))
        row["same_indices"] = bool(np.array_equal(row["indices"], exact["indices"]))
        row["speedup_vs_brute_force"] = exact["search_s"] / row["search_s"]
        # Medians against medians as well: on a shared machine the best of a few runs flatters either side.
        row["speedup_vs_brute_force_median"] = exact["search_median_s"] / row["search_median_s"]
        row["speedup_vs_faiss_flat"] = by_name["faiss Flat"]["search_s"] / row["search_s"]
    for row in rows:  # the results themselves stay out of the report
        del row["distances"], row["indices"]


def run(n: int, bits_list: list[int], data_list: list[str], nq: int, k: int, repeat: int, threads: int,
        clusters: int, flip: float, nflip: int, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    import faiss

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "threads": threads},
        "versions": {"numpy": np.__version__, "numba": numba.__version__, "faiss": faiss.__version__},
        "settings": {"n": n, "queries": nq, "k": k, "repeat": repeat, "clusters": clusters, "flip": flip, "nflip": nflip},
        "load_before": load(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="mih-bench-") as tmp:
        folder = Path(tmp)
        for data in data_list:
            for bits in bits_list:
                draw_codes(folder / "db.npy", data, n, bits, 1, clusters, flip)
                draw_codes(folder / "q.npy", data, nq, bits, 2, clusters, flip)
                rows = []
                for name in methods(nflip):
                    log(f"{data} {bits} bits: {name} (load {load()})")
                    rows.append(_isolated(measure, name, folder, bits, k, repeat, threads, nflip))
                compare(rows, k)
                log(f"{data} {bits} bits: our brute force and MIH alternating in one process (load {load()})")
                pairs = _isolated(paired, folder, bits, k, repeat, threads)
                tables, table_bits = faiss_hash_params(bits, n)
                report["runs"].append({"data": data, "bits": bits, "substrings": default_substrings(bits, n),
                                       "faiss_hash": {"tables": tables, "bits": table_bits, "nflip": nflip},
                                       "rows": rows, "paired": pairs})  # fmt: skip
    report["load_after"] = load()
    return report


def table(report: dict[str, Any]) -> str:
    header = ["data", "bits", "method", "build s", "search s", "median s", "queries/s", "x brute", "x brute (medians)",
              "x faiss Flat", "recall", "exact", "index MB", "RSS+ MB"]  # fmt: skip
    lines = [header]
    nq = report["settings"]["queries"]
    for run_ in report["runs"]:
        for r in run_["rows"]:
            exact = "yes" if r["same_indices"] else "distances" if r["same_distances"] else "no"
            lines.append([run_["data"], str(run_["bits"]), r["method"], f"{r['build_s']:.2f}", f"{r['search_s']:.3f}",
                          f"{r['search_median_s']:.3f}", f"{nq / r['search_s']:,.0f}", f"{r['speedup_vs_brute_force']:.1f}",
                          f"{r['speedup_vs_brute_force_median']:.1f}", f"{r['speedup_vs_faiss_flat']:.1f}", f"{r['recall']:.4f}", exact, f"{r['index_mb']:,.0f}",
                          f"{r['rss_over_data_mb']:,.0f}"])  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    s = report["settings"]
    out = [f"{s['n']:,} codes, {s['queries']} queries, k={s['k']}, {report['machine']['threads']} threads on "
           f"{report['machine']['cpu']}; load {report['load_before']} -> {report['load_after']}"]  # fmt: skip
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out += [f"{r['data']} {r['bits']} bits: MIH {r['substrings']} substrings; FAISS hashes {r['faiss_hash']['tables']} "
            f"x {r['faiss_hash']['bits']} bits, nflip {r['faiss_hash']['nflip']}; MIH vs our brute force alternating in "
            f"one process: {r['paired']['speedup_median']:.1f}x median of "
            f"{', '.join(f'{x:.1f}' for x in r['paired']['speedups'])}" for r in report["runs"]]  # fmt: skip
    return "\n".join(out)


@click.command()
@click.option("--n", "n", default=10_000_000, show_default=True, help="Database codes.")
@click.option("--bits", "bits_list", multiple=True, type=int, default=(32, 64), show_default=True)
@click.option("--data", "data_list", multiple=True, type=click.Choice(["uniform", "clustered"]),
              default=("uniform", "clustered"), show_default=True)  # fmt: skip
@click.option("--queries", default=1000, show_default=True)
@click.option("-k", "k", default=10, show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Timed searches per method (the best is kept).")
@click.option("--threads", default=2, show_default=True, help="Threads for ours and for FAISS.")
@click.option("--clusters", default=1000, show_default=True, help="Prototypes of the clustered codes.")
@click.option("--flip", default=0.1, show_default=True, help="Bit-flip probability around a prototype.")
@click.option("--nflip", default=2, show_default=True, help="Bits FAISS's hash indexes flip when probing.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
def main(n, bits_list, data_list, queries, k, repeat, threads, clusters, flip, nflip, json_out) -> None:
    """Run the MIH benchmark and print its table."""
    check_parent(json_out)
    report = run(n, list(bits_list), list(data_list), queries, k, repeat, threads, clusters, flip, nflip,
                 lambda line: click.echo(line, err=True))  # fmt: skip
    click.echo(table(report))
    if json_out:
        write_json(json_out, report)


if __name__ == "__main__":
    main()
