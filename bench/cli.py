"""`dsah-rt bench`: encoding on every backend and precision, and retrieval against its anchors.

Without arguments it measures the embedded default model (DSaH on the `small` backbone, randomly
initialised, exported to ONNX in a temporary folder) on generated images, and retrieval on
generated codes, in under two minutes on a 2-core machine.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from dsah_rt.errors import UserError

TIMING_CONVENTIONS = (
    "per-iteration wall times (CUDA events for H2D / compute / D2H on the GPU), percentiles by "
    "nearest rank (the ceil(p/100 n)-th smallest time, never interpolated); throughput = images / "
    "summed iteration time."
)
DEFAULT_MODEL = ("small", 48, 64)  # backbone, bits, input size of the embedded model


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in values):
        raise click.BadParameter(f"every value must be at least 1, got {value!r}")
    return values


def _backends(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from dsah_rt.bench.engine import BY_NAME

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise click.BadParameter(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return names


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for dist in ("dsah-rt", "numpy", "numba", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "faiss-cpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _check_images(size: int) -> Any:
    import numpy as np

    try:
        from dsah_rt.export.verify import scene_images
    except ImportError:  # no training extra: noise still exercises every bit of the graph
        return np.random.default_rng(7).integers(0, 256, (32, 3, size, size), dtype=np.uint8)
    return scene_images(32, size, seed=7)


def resolve_model(model: str | None, run: str | None, bits: int | None, work: Path) -> dict[str, Any]:
    """run_dir, onnx_path, bits, input_size and a description of what is measured."""
    from dsah_rt.runners import model_kind

    if model is None:
        from dsah_rt.bench.sample_run import make_run
        from dsah_rt.export.pipeline import export_run

        backbone, k, size = DEFAULT_MODEL
        run_dir = make_run(work / "run", backbone, k, size)
        export_run(run_dir, work / "model.onnx")
        return {"run_dir": str(run_dir), "onnx_path": str(work / "model.onnx"), "bits": k, "input_size": size,
                "description": f"embedded default, DSaH on the {backbone} backbone, {k} bits, {size} px, randomly "
                               "initialised, its bits balanced over rendered scenes (speed and bit agreement only; its "
                               "codes carry no meaning), on generated scenes"}  # fmt: skip
    kind = model_kind(model)
    if kind == "engine":
        raise UserError(f"{model}: bench builds its own engines; pass the model.onnx or the RUN_DIR")
    if kind == "run":
        if run is not None:
            raise UserError("--run is for a model.onnx; --model is already a RUN_DIR")
        from dsah_rt.export.pipeline import export_run
        from dsah_rt.train.run import resolve_run_dir

        run_dir, onnx_path = resolve_run_dir(model, bits), work / "model.onnx"
        export_run(run_dir, onnx_path)
    elif bits is not None:
        raise UserError("--bits picks the sub-run of a RUN_DIR; a model.onnx has one code length")
    else:
        run_dir, onnx_path = run, Path(model)
    from dsah_rt.runners.ort import read_onnx_info

    info = read_onnx_info(onnx_path)
    where = f"{model}" + (f" with the reference {run_dir}" if run_dir and kind == "onnx" else "")
    return {"run_dir": run_dir and str(run_dir), "onnx_path": str(onnx_path), "bits": info.bits,
            "input_size": info.input_size,
            "description": f"{where}: {info.method} on {info.backbone}, {info.bits} bits, {info.input_size} px, "
                           "on generated scenes"}  # fmt: skip


def bench_retrieval(databases: list[int], queries: int, bits: int, threads: int) -> dict[str, Any]:
    """MAP@all against the NumPy codebase MAP and top-k against faiss-cpu, on generated codes."""
    from dsah_rt import hamming
    from dsah_rt.bench.retrieval import bench_map, bench_topk

    hamming.set_threads(threads)
    # NumPy's MAP is O(N log N) per query and independent across queries: it is timed on a subset
    # of about 10 M pairs and scaled to all queries, like bench/retrieval.py.
    return {
        "map": [bench_map(queries, n, bits, 10, numpy_queries=min(queries, max(10, 10_000_000 // n))) for n in databases],
        "topk": [row for n in databases for row in bench_topk(queries, n, bits, [10, 100], threads)],
        "numpy_note": "NumPy MAP timed on a subset of queries and extrapolated linearly",
    }  # fmt: skip


@click.command("bench")
@click.option("--model", type=click.Path(exists=True), help="A RUN_DIR or a model.onnx (default: the embedded model).")
@click.option("--run", "run", type=click.Path(exists=True, file_okay=False), help="RUN_DIR of a --model model.onnx: the PyTorch reference and torch backends.")
@click.option("--bits", type=int, help="Which sub-run of a multi-bit RUN_DIR.")
@click.option("--backends", default="", callback=_backends, help="Comma-separated backend names (default: all; unavailable ones are listed with the reason).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_ints)
@click.option("--warmup-ms", default=200.0, show_default=True, help="Warm-up time per batch size.")
@click.option("--duration-s", default=1.0, show_default=True, help="Minimum timed duration per batch size.")
@click.option("--min-iters", default=10, show_default=True, help="Minimum timed iterations per batch size.")
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True, help="CPU threads for every backend and the retrieval kernels.")
@click.option("--retrieval-db", default="59000,200000", show_default=True, callback=_ints, help="Database sizes for retrieval.")
@click.option("--retrieval-queries", default=1000, show_default=True)
@click.option("--retrieval-bits", default=48, show_default=True)
@click.option("--retrieval/--no-retrieval", default=True, show_default=True)
@click.option("--isolate/--no-isolate", default=True, show_default=True, help="Measure each backend in its own process (a clean peak RSS per backend).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--md", "md_out", type=click.Path(dir_okay=False), help="Write the tables as markdown.")
@click.option("--plots", type=click.Path(file_okay=False), help="Folder for throughput.png and latency.png.")
def bench(model: str | None, run: str | None, bits: int | None, backends: list[str], batch_sizes: list[int],
          warmup_ms: float, duration_s: float, min_iters: int, threads: int, retrieval_db: list[int],
          retrieval_queries: int, retrieval_bits: int, retrieval: bool, isolate: bool, json_out: str | None,
          md_out: str | None, plots: str | None) -> None:  # fmt: skip
    """Benchmark encoding on every backend and precision, and retrieval against NumPy and faiss-cpu."""
    from dsah_rt.atomic import check_parent, write_report
    from dsah_rt.bench import engine, report as rep
    from dsah_rt.bench.timing import load, machine
    from dsah_rt.omp import passive_openmp

    omp_policy = passive_openmp()
    for out in (json_out, md_out):
        check_parent(out)
    check_parent(plots)
    if min(batch_sizes, default=0) < 1:
        raise UserError("--batch-sizes needs at least one batch size")
    started = time.perf_counter()
    report: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "versions": _versions(), "load_start": load(),
                              "conventions": TIMING_CONVENTIONS}  # fmt: skip
    report["settings"] = {"batch_sizes": batch_sizes, "warmup_ms": warmup_ms, "duration_s": duration_s,
                          "min_iters": min_iters, "threads": threads, "isolated": isolate,
                          "omp_wait_policy": omp_policy}  # fmt: skip
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="dsah-bench-") as tmp:
        work = Path(tmp)
        log("preparing the model")
        found = resolve_model(model, run, bits, work)
        images = _check_images(found["input_size"])
        ref = engine.reference_codes(found["run_dir"], images, threads) if found["run_dir"] else None
        job = engine.Job(found["run_dir"], found["onnx_path"], str(work), found["input_size"], found["bits"],
                         batch_sizes, warmup_ms, duration_s, min_iters, threads, images, ref)  # fmt: skip
        report["model"] = {k: v for k, v in found.items() if k not in ("run_dir", "onnx_path")}
        report["model"]["reference"] = "PyTorch eager fp32 CPU" if ref is not None else None
        report["encoding"] = engine.run_backends(backends, job, isolate, log)
    if retrieval:
        log(f"retrieval (load {load()})")
        report["retrieval"] = bench_retrieval(retrieval_db, retrieval_queries, retrieval_bits, threads)
    report["load_end"] = load()
    report["seconds"] = time.perf_counter() - started
    click.echo(rep.text(report))
    write_report(report, rep.markdown(report), json_out, md_out)
    if plots:
        Path(plots).mkdir(exist_ok=True)
        for path in rep.write_plots(report, plots):
            click.echo(f"wrote {path}")
