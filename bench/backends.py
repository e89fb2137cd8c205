"""Encoding measurements: one model on every backend and precision, each in its own process.

A backend is measured in a fresh spawned process so that its peak host memory (ru_maxrss of that
process) is its own: one process for all would report the largest backend everywhere. The parent
computes the reference codes (PyTorch eager, fp32, CPU) once; each child compares its codes with
them bit by bit.

The table is the runner registry's backends (`runner_entries`: what `--backend` accepts, with
the registry's own reasons when one cannot run here) plus variants of the eager torch model that
only the benchmark measures, built by `torch_encoder`, which the GPU script (`bench/gpu.py`) shares.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsah_rt.bench.timing import load, measure, quantiles, summarize
from dsah_rt.codes import unpack
from dsah_rt.runners.registry import backends, get_backend


@dataclass(frozen=True)
class Backend:
    name: str
    framework: str  # torch: a variant of the eager model, measured here | runner: a registered dsah_rt runner
    device: str = "cpu"
    precision: str = "fp32"  # fp32 (TF32 off) | tf32 | fp16 (autocast; for an engine, its build precision)
    channels_last: bool = False
    mode: str = "eager"  # eager | cuda-graphs | compile
    # Measured only when asked for by name (--backends): too slow for the 2-minute default run.
    opt_in: str = ""
    runner: str = ""  # the dsah_rt.runners backend a runner entry runs


TORCH_VARIANTS: tuple[Backend, ...] = (
    Backend("torch-cpu-fp32", "torch"),
    Backend("torch-cpu-fp32-cl", "torch", channels_last=True),
    Backend("torch-cpu-compile", "torch", mode="compile",
            opt_in="it compiles once per batch size: about a minute on 2 CPU cores, half the default run's budget"),
    Backend("torch-cuda-fp32", "torch", "cuda"),
    Backend("torch-cuda-tf32", "torch", "cuda", "tf32"),
    Backend("torch-cuda-fp16-cl", "torch", "cuda", "fp16", True),
    Backend("torch-cuda-graphs-fp16-cl", "torch", "cuda", "fp16", True, "cuda-graphs"),
    Backend("torch-cuda-compile-fp16-cl", "torch", "cuda", "fp16", True, "compile"),
)
ENGINE_PRECISIONS = ("fp32", "fp16")  # the engines built for each registered engine backend


def runner_entries() -> tuple[Backend, ...]:
    """The registered runners: one entry for each that runs an ONNX file, one per build precision for
    each that runs an engine. The `run` kind (the torch reference) is measured by the torch variants."""
    out: list[Backend] = []
    for spec in backends():
        if spec.kind == "onnx":
            out.append(Backend(spec.name, "runner", spec.device, runner=spec.name))
        elif spec.kind == "engine":
            out += [Backend(f"{spec.name}-{p}", "runner", spec.device, p, runner=spec.name) for p in ENGINE_PRECISIONS]
    return tuple(out)


BACKENDS: tuple[Backend, ...] = TORCH_VARIANTS + runner_entries()
BY_NAME = {b.name: b for b in BACKENDS}


@dataclass
class Job:
    """What a child needs to measure one backend; plain data, so it pickles to a spawned process."""

    run_dir: str | None
    onnx_path: str | None
    engine_dir: str  # where TensorRT engines are built
    input_size: int
    bits: int
    batch_sizes: list[int]
    warmup_ms: float
    duration_s: float
    min_iters: int
    threads: int
    check_images: np.ndarray  # uint8 NCHW, the images the bit agreement is computed on
    reference_codes: np.ndarray | None  # PyTorch eager fp32 CPU codes of check_images


def unavailable_reason(backend: Backend, job: Job, requested: bool) -> str | None:
    """Why `backend` cannot be measured here (None: it can). Cheap: imports, no model is loaded."""
    if backend.opt_in and not requested:
        return f"not in the default set ({backend.opt_in}); ask for it with --backends {backend.name}"
    if backend.framework == "torch":
        if job.run_dir is None:
            return "needs the training RUN_DIR (--model RUN_DIR, or --run beside a model.onnx)"
        torch_reason = get_backend("torch").unavailable()
        return torch_reason or (cuda_unavailable_reason() if backend.device == "cuda" else None)
    spec = get_backend(backend.runner)
    if job.onnx_path is None:
        return "needs a model.onnx"
    if spec.kind == "engine" and job.run_dir is None:
        return "building an engine needs the RUN_DIR (it is verified against PyTorch)"
    return spec.unavailable()


def cuda_unavailable_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


# --- torch variants (shared with bench/gpu.py) ---------------------------------------------------


def torch_encoder(model: Any, config: dict[str, Any], backend: Backend) -> Callable[[Any], Any]:
    """The deployed function (uint8 images -> packed codes) on `backend`'s device, precision and mode.

    fp16 is autocast (convolutions and matmuls in fp16; min-max, sign and packing stay fp32, as in
    the TensorRT build); fp32 turns TF32 off so it is a true fp32 baseline. CUDA graphs capture one
    graph per input shape on first use, with static input and output buffers.
    """
    import torch

    from dsah_rt.export.fused import FusedEncoder

    tf32 = backend.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    fmt = torch.channels_last if backend.channels_last else torch.contiguous_format
    fused = FusedEncoder(model, config).to(backend.device).to(memory_format=fmt).eval()
    if backend.mode == "compile":
        fused = torch.compile(fused, dynamic=False)
    autocast = backend.precision == "fp16"
    # No autocast weight cache: each weight is cast once per call anyway, and a cache filled while
    # a CUDA graph is captured would hold graph-pool memory outside the graph.

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(backend.device, torch.float16, enabled=autocast, cache_enabled=False):
            return fused(images.contiguous(memory_format=fmt))

    if backend.mode != "cuda-graphs":
        return run
    graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def replay(images: torch.Tensor) -> torch.Tensor:
        key = tuple(images.shape)
        if key not in graphs:
            static_in = images.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # cuDNN picks its algorithms before capture, not during it
                    run(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(static_in)
            graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = graphs[key]
        static_in.copy_(images)
        graph.replay()
        return static_out

    return replay


def _discard(fn: Callable[[], Any]) -> Callable[[], None]:
    """A timing step: its output is dropped so `measure` times the call's wall clock."""

    def step() -> None:
        fn()

    return step


def torch_step(encoder: Callable[[Any], Any], images: np.ndarray, device: str) -> tuple[Callable[[], Any], Callable[[], np.ndarray]]:
    """(timed step, codes getter) for one batch. On CUDA the step times host-to-device, compute and
    device-to-host with CUDA events (pinned host buffers, as a deployment would use)."""
    import torch

    host_in = torch.from_numpy(images)
    if device == "cpu":
        return _discard(lambda: encoder(host_in)), (lambda: encoder(host_in).numpy())
    host_in = host_in.pin_memory()
    dev_in = torch.empty(host_in.shape, dtype=torch.uint8, device=device)
    dev_in.copy_(host_in)
    host_out = torch.empty(tuple(encoder(dev_in).shape), dtype=torch.uint8).pin_memory()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

    def step() -> dict[str, float]:
        events[0].record()
        dev_in.copy_(host_in, non_blocking=True)
        events[1].record()
        out = encoder(dev_in)
        events[2].record()
        host_out.copy_(out, non_blocking=True)
        events[3].record()
        events[3].synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        return {"h2d": ms[0] / 1e3, "compute": ms[1] / 1e3, "d2h": ms[2] / 1e3, "total": sum(ms) / 1e3}

    def codes() -> np.ndarray:
        step()
        return host_out.numpy().copy()

    return step, codes


def _torch_prepared(backend: Backend, job: Job) -> tuple[Callable[[np.ndarray], tuple[Any, Any]], int, dict[str, Any]]:
    import torch

    from dsah_rt.train.run_dir import load_run

    torch.set_num_threads(job.threads)
    model, config = load_run(job.run_dir, device=backend.device)
    encoder = torch_encoder(model, config, backend)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if backend.precision == "fp16":
        size //= 2  # what the fp16 weights would take; autocast keeps fp32 masters
    info = {"runtime": f"torch {torch.__version__}", "threads": torch.get_num_threads(), "size_of": "state dict"}
    if backend.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return (lambda images: torch_step(encoder, images, backend.device)), size, info


def _runner_prepared(backend: Backend, job: Job) -> tuple[Callable[[np.ndarray], tuple[Any, Any]], int, dict[str, Any]]:
    from dsah_rt.runners import make_runner

    if get_backend(backend.runner).kind == "engine":
        from dsah_rt.export.pipeline import export_run

        path = Path(job.engine_dir) / f"{backend.name}.engine"
        export_run(job.run_dir, Path(job.engine_dir) / f"{backend.name}.onnx", trt=path,
                   precision=backend.precision, max_batch=max(job.batch_sizes))  # fmt: skip
    else:
        path = Path(job.onnx_path)
    runner = make_runner(path, backend.runner, threads=job.threads)

    def prepare(images: np.ndarray) -> tuple[Any, Any]:
        return _discard(lambda: runner.infer(images)), (lambda: runner.infer(images))

    info = {**runner.describe(), "size_of": path.name,
            "phases": "end to end only: the runner copies in and out inside one call"}  # fmt: skip
    return prepare, path.stat().st_size, info


def measure_backend(backend: Backend, job: Job) -> dict[str, Any]:
    """Throughput and latency per batch size, bit agreement, model size, this process's peak RSS."""
    started = time.perf_counter()
    prepared = _torch_prepared if backend.framework == "torch" else _runner_prepared
    prepare, size_bytes, info = prepared(backend, job)
    rows = []
    for batch in job.batch_sizes:
        images = job.check_images[np.arange(batch) % len(job.check_images)]
        step, _ = prepare(np.ascontiguousarray(images))
        phases = measure(step, job.warmup_ms, job.duration_s, job.min_iters)
        total = phases["total"]
        rows.append({
            "batch": batch,
            "images_per_s": batch * len(total) / float(total.sum()),
            "latency_ms": summarize(total),
            "latency_quantiles_ms": quantiles(total),
            **{f"{name}_ms": summarize(v) for name, v in phases.items() if name != "total"},
        })  # fmt: skip
    _, codes = prepare(job.check_images)
    agreement = None
    if job.reference_codes is not None:
        flipped = unpack(codes(), job.bits) != unpack(job.reference_codes, job.bits)
        agreement = {"agreement": 1.0 - float(flipped.mean()), "bits_compared": int(flipped.size),
                     "flipped": int(flipped.sum())}  # fmt: skip
    return {
        "backend": backend.name, "status": "ok", "spec": asdict(backend), "info": info,
        "model_bytes": int(size_bytes), "bit_agreement": agreement,
        "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - started, "rows": rows,
    }  # fmt: skip


def peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: after fork + exec that still holds the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):  # not Linux: the closest portable figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_isolated(backend: Backend, job: Job) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure_backend, backend, job).result()


def run_backends(
    names: list[str], job: Job, isolate: bool = True, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    """Every backend in `names` (all when empty): measured, or listed with why it is not."""
    requested = set(names)
    results = []
    for backend in BACKENDS if not names else [BY_NAME[n] for n in names]:
        reason = unavailable_reason(backend, job, backend.name in requested)
        if reason is not None:
            results.append({"backend": backend.name, "status": "unavailable", "reason": reason, "spec": asdict(backend)})
            continue
        log(f"measuring {backend.name} (load {load()})")
        try:
            result = (_measure_isolated if isolate else measure_backend)(backend, job)
        except Exception as exc:  # a backend that fails to start is a result, not the end of the run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result = {"backend": backend.name, "status": "failed", "reason": f"{type(exc).__name__}: {first[:300]}",
                      "spec": asdict(backend)}  # fmt: skip
        if not isolate:
            result["peak_rss_note"] = "peak of the whole benchmark process so far (--no-isolate)"
        results.append(result)
    return results


def reference_codes(run_dir: str, images: np.ndarray, threads: int) -> np.ndarray:
    """The PyTorch reference (eager, fp32, CPU) codes every backend is compared with."""
    import torch

    from dsah_rt.runners import make_runner

    torch.set_num_threads(threads)
    with make_runner(run_dir, "torch") as ref:
        return ref.infer(images)
