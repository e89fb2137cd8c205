"""The `dsah-rt bench` run as a library call: `run_bench(...)` measures, writes and returns the report.

Encoding on every registered backend and precision (bench/backends.py), and retrieval against the
NumPy codebase MAP and faiss-cpu (bench/retrieval.py). Without a model it measures the embedded
default (DSaH on the `small` backbone, randomly initialised, exported to ONNX in a temporary
folder) on generated images, in under two minutes on a 2-core machine.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dsah_rt.errors import UserError

FORMAT = "dsah-rt-bench/1"  # the report's layout; a reader checks it before trusting the keys
TIMING_CONVENTIONS = (
    "per-iteration wall times (CUDA events for H2D / compute / D2H on the GPU), percentiles by "
    "numpy.percentile(method='inverted_cdf'), i.e. nearest rank (the ceil(p/100 n)-th smallest time, "
    "never interpolated); throughput = images / summed iteration time."
)
DEFAULT_MODEL = ("small", 48, 64)  # backbone, bits, input size of the embedded model


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
        from dsah_rt.train.run_dir import resolve_run_dir

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
    from dsah_rt import native
    from dsah_rt.bench.retrieval import bench_map, bench_topk

    native.set_threads(threads)
    # NumPy's MAP is O(N log N) per query and independent across queries: it is timed on a subset
    # of about 10 M pairs and scaled to all queries, like bench/retrieval.py.
    return {
        "map": [bench_map(queries, n, bits, 10, numpy_queries=min(queries, max(10, 10_000_000 // n))) for n in databases],
        "topk": [row for n in databases for row in bench_topk(queries, n, bits, [10, 100], threads)],
        "numpy_note": "NumPy MAP timed on a subset of queries and extrapolated linearly",
    }  # fmt: skip


def run_bench(
    model: str | None = None,
    run: str | None = None,
    bits: int | None = None,
    backends: Sequence[str] = (),
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup_ms: float = 200.0,
    duration_s: float = 1.0,
    min_iters: int = 10,
    threads: int | None = None,
    retrieval_db: Sequence[int] = (59_000, 200_000),
    retrieval_queries: int = 1000,
    retrieval_bits: int = 48,
    retrieval: bool = True,
    isolate: bool = True,
    json_out: str | os.PathLike[str] | None = None,
    md_out: str | os.PathLike[str] | None = None,
    plots: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Benchmark encoding (`backends`: names of bench/backends.py, all when empty) and retrieval; write
    the report to `json_out` / `md_out` and its plots into `plots`, each only when given."""
    from dsah_rt.atomic import check_parent, write_report
    from dsah_rt.bench.backends import Job, reference_codes, run_backends
    from dsah_rt.bench.report import markdown, write_plots
    from dsah_rt.bench.timing import load, machine
    from dsah_rt.omp import passive_openmp

    omp_policy = passive_openmp()
    for out in (json_out, md_out):
        check_parent(out)
    check_parent(plots)
    if min(batch_sizes, default=0) < 1:
        raise UserError("--batch-sizes needs at least one batch size")
    threads = threads or os.cpu_count() or 1
    started = time.perf_counter()
    report: dict[str, Any] = {"format": FORMAT, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "versions": _versions(), "load_start": load(),
                              "conventions": TIMING_CONVENTIONS}  # fmt: skip
    report["settings"] = {"batch_sizes": list(batch_sizes), "warmup_ms": warmup_ms, "duration_s": duration_s,
                          "min_iters": min_iters, "threads": threads, "isolated": isolate,
                          "omp_wait_policy": omp_policy}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dsah-bench-") as tmp:
        work = Path(tmp)
        log("preparing the model")
        found = resolve_model(model, run, bits, work)
        images = _check_images(found["input_size"])
        ref = reference_codes(found["run_dir"], images, threads) if found["run_dir"] else None
        job = Job(found["run_dir"], found["onnx_path"], str(work), found["input_size"], found["bits"],
                  list(batch_sizes), warmup_ms, duration_s, min_iters, threads, images, ref)  # fmt: skip
        report["model"] = {k: v for k, v in found.items() if k not in ("run_dir", "onnx_path")}
        report["model"]["reference"] = "PyTorch eager fp32 CPU" if ref is not None else None
        report["encoding"] = run_backends(list(backends), job, isolate, log)
    if retrieval:
        log(f"retrieval (load {load()})")
        report["retrieval"] = bench_retrieval(list(retrieval_db), retrieval_queries, retrieval_bits, threads)
    report["load_end"] = load()
    report["seconds"] = time.perf_counter() - started
    write_report(report, markdown(report), json_out, md_out)
    if plots:
        Path(plots).mkdir(exist_ok=True)
        for path in write_plots(report, plots):
            log(f"wrote {path}")
    return report
