"""The main job on embedded defaults: generated codes at the CIFAR-10 protocol size, evaluated and
searched by the retrieval core, checked against the deep-hashing codebases' NumPy MAP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from dsah_rt.atomic import write_json
from dsah_rt.bench.reference import numpy_map
from dsah_rt.bench.retrieval import labelled_codes
from dsah_rt.codes import pack, read_codes, read_labels, write_codes
from dsah_rt.errors import UserError
from dsah_rt.index import BinaryIndex
from dsah_rt.metrics import evaluate


def run_demo(out: Path, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    bits, classes = 48, 10
    q01, db01, ql, dl = labelled_codes(1000, 59_000, bits, classes, seed)
    write_codes(out / "query_codes.npy", pack(q01), bits, rows=[f"query/{i}" for i in range(len(q01))])
    write_codes(out / "db_codes.npy", pack(db01), bits, rows=[f"db/{i}" for i in range(len(db01))])
    np.save(out / "query_labels.npy", ql)
    np.save(out / "db_labels.npy", dl)
    echo(f"wrote 1,000 query and 59,000 database codes ({bits} bits, {classes} classes) to {out}")

    # Everything below reads the files back, as a user's pipeline would.
    q, d = read_codes(out / "query_codes.npy"), read_codes(out / "db_codes.npy")
    res = evaluate(q.packed, d.packed, read_labels(out / "query_labels.npy"), read_labels(out / "db_labels.npy"), bits=q.bits)
    index = BinaryIndex(bits)
    index.add(d.packed)
    start = time.perf_counter()
    dist, idx = index.search(q.packed, 100)
    search_s = time.perf_counter() - start

    m = 50  # the NumPy reference is ~3 ms a query: time a subset and extrapolate
    onehot = np.eye(classes)
    start = time.perf_counter()
    ref = numpy_map(q01[:m] * 2.0 - 1, db01 * 2.0 - 1, onehot[ql[:m]], onehot[dl], kind="stable")
    numpy_s = (time.perf_counter() - start) / m * len(q01)
    ours_subset = evaluate(q.packed[:m], d.packed, ql[:m], dl, bits=bits)["map"]
    summary = {
        "map": res["map"], "map_tie_aware": res["map_tie_aware"], "map_tie_best": res["map_tie_best"],
        "map_tie_worst": res["map_tie_worst"], "precision_at_radius_2": res["precision_at_radius"],
        "eval_seconds": res["seconds"], "search_top100_seconds": search_s,
        "numpy_map_seconds_extrapolated": numpy_s, "speedup_vs_numpy": numpy_s / res["seconds"],
        "abs_diff_vs_numpy_stable_on_subset": abs(ours_subset - ref),
        "nearest_of_query_0": [f"{d.rows[i]} (distance {dd})" for i, dd in zip(idx[0, :5], dist[0, :5])],
    }
    write_json(out / "metrics.json", res)
    write_json(out / "summary.json", summary)
    try:
        from dsah_rt.plots import plot_pr

        plot_pr({"generated codes": res}, out / "pr.png")
        figure = f"{out / 'pr.png'}"
    except UserError as exc:  # matplotlib is optional; the numbers are the job
        figure = f"not written ({exc})"
    width = 38
    for key in ["map", "map_tie_aware", "map_tie_best", "map_tie_worst", "precision_at_radius_2"]:
        echo(f"{key:<{width}}{summary[key]:.6f}")
    echo(f"{'eval (MAP + curves) seconds':<{width}}{res['seconds']:.3f}")
    echo(f"{'top-100 search seconds':<{width}}{search_s:.3f}")
    echo(f"{'NumPy codebase MAP seconds (est.)':<{width}}{numpy_s:.2f}  ({summary['speedup_vs_numpy']:.0f}x slower)")
    echo(f"{'|ours - NumPy stable| (50 queries)':<{width}}{summary['abs_diff_vs_numpy_stable_on_subset']:.1e}")
    echo(f"{'nearest to query 0':<{width}}{', '.join(summary['nearest_of_query_0'])}")
    echo(f"PR figure: {figure}; metrics: {out / 'metrics.json'}")
    return summary
