"""GPU encoding benchmark, for a lent device: unattended, at most `--budget-s` seconds, JSON as it goes.

    python -m dsah_rt.bench.gpu --out bench/results/gpu-DATE.json [--budget-s 270]
    python -m dsah_rt.bench.gpu --out /tmp/t.json --device cpu --tiny      # the CPU smoke run the tests use

Measures the deployed function (uint8 images -> packed codes, `FusedEncoder`) of DSaH on VGG-16 and
on efficientnet_lite0, both at 224 px and 48 bits with random weights (speed does not depend on
them), as PyTorch eager fp32 (TF32 off), TF32, fp16 channels-last (autocast), CUDA graphs and
`torch.compile` (fp16 channels-last), at batch 1 to 256. Per cell: images/s end to end and on the
compute alone, latency percentiles (nearest rank), H2D / compute / D2H by CUDA events, and the
fraction of this GPU's peak that the compute reaches: FLOPs per image (FlopCounterMode, multiply-add
= 2) x images/s over the dense-matmul peak of the same precision, measured in the same run.

The budget is enforced twice: a cell that would not finish before the deadline is skipped with
that reason, and a watchdog writes the JSON and exits if anything (a long compile) overruns.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.atomic import write_json
from dsah_rt.bench.backends import BY_NAME, cuda_unavailable_reason, torch_encoder, torch_step
from dsah_rt.bench.timing import load, machine, measure, summarize

BITS = 48
MODELS = {"vgg16": 224, "efficientnet_lite0": 224}
TINY_MODELS = {"small": 32}
# Cheapest first, compile last: its first call per shape compiles for tens of seconds, so when the
# budget runs short it is compile cells that are skipped, not the eager baselines.
CUDA_VARIANTS = ("torch-cuda-fp16-cl", "torch-cuda-graphs-fp16-cl", "torch-cuda-tf32", "torch-cuda-fp32",
                 "torch-cuda-compile-fp16-cl")  # fmt: skip
CPU_VARIANTS = ("torch-cpu-fp32", "torch-cpu-fp32-cl")
WATCHDOG_GRACE_S = 15


class Recorder:
    """The report, rewritten atomically after every cell so a killed run leaves its results."""

    def __init__(self, path: Path, report: dict[str, Any]) -> None:
        self.path, self.report, self.lock = path, report, threading.Lock()

    def save(self, **fields: Any) -> None:
        with self.lock:
            self.report.update(fields)
            write_json(self.path, self.report)


def matmul_peak(device: str, precision: str, n: int, duration_s: float) -> dict[str, Any]:
    """Dense n x n x n matmul TFLOP/s in `precision` (fp32 with TF32 off, tf32, fp16, bf16)."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def step() -> None:
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    times = measure(step, 100, duration_s, 5)["total"]
    best = float(times.min())
    return {"precision": precision, "n": n, "tflops": 2 * n**3 / best / 1e12, "iterations": len(times)}


def flops_per_image(encoder: Any, size: int, device: str) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        encoder(images)
    return int(counter.get_total_flops())


def build(backbone: str, size: int) -> tuple[Any, dict[str, Any]]:
    import torch

    from dsah_rt.train.methods import build_model
    from dsah_rt.train.run_dir import resolved_config

    torch.manual_seed(0)
    model = build_model("dsah", backbone, BITS, weights="none")
    return model.eval(), resolved_config(model, size, training={}, weights_source="none (random init)")


def bench_model(backbone: str, size: int, variants: tuple[str, ...], opts: dict[str, Any], deadline: float,
                peaks: dict[str, float], rec: Recorder) -> dict[str, Any]:  # fmt: skip
    """Every variant x batch size of one model, skipping what would not finish by `deadline`."""
    import torch

    device = opts["device"]
    model, config = build(backbone, size)
    fp32 = BY_NAME["torch-cuda-fp32" if device == "cuda" else "torch-cpu-fp32"]
    flops = flops_per_image(torch_encoder(model, config, fp32), size, device)
    out: dict[str, Any] = {"backbone": backbone, "input_size": size, "bits": BITS, "flops_per_image": flops,
                           "weights": "random (speed does not depend on them)", "variants": []}  # fmt: skip
    rec.report["models"].append(out)
    cell_s = opts["warmup_ms"] / 1e3 + opts["duration_s"]
    for name in variants:
        backend = BY_NAME[name]
        entry: dict[str, Any] = {"variant": name, "precision": backend.precision, "mode": backend.mode,
                                 "channels_last": backend.channels_last, "rows": []}  # fmt: skip
        out["variants"].append(entry)
        if backend.mode == "compile":
            import torch._dynamo

            torch._dynamo.reset()  # compiled graphs of earlier models would count against the recompile limit
        try:
            encoder = torch_encoder(model, config, backend)
        except Exception as exc:  # noqa: BLE001 - e.g. no Triton for compile: the other variants still run
            entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        first_call_s = 0.0  # compile / capture cost of the last new shape: the estimate for the next one
        # Compile cells largest batch first: that is the headline number if the budget runs out.
        for batch in sorted(opts["batch_sizes"], reverse=backend.mode == "compile"):
            if time.monotonic() + cell_s + first_call_s > deadline:
                entry["rows"].append({"batch": batch, "status": "skipped", "reason": "time budget"})
                continue
            images = np.random.default_rng(batch).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
            try:
                started = time.monotonic()
                step, _ = torch_step(encoder, images, device)
                step()  # a new shape compiles, captures or autotunes here: the estimate for the next one
                first_call_s = time.monotonic() - started
                phases = measure(step, opts["warmup_ms"], opts["duration_s"], opts["min_iters"])
            except Exception as exc:  # noqa: BLE001 - an OOM or a compile failure is a result for this cell
                entry["rows"].append({"batch": batch, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            entry["rows"].append(_row(batch, phases, flops, peaks.get(backend.precision), first_call_s))
            rec.save()
        del encoder
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _row(batch: int, phases: dict[str, np.ndarray], flops: int, peak_tflops: float | None, first_call_s: float) -> dict[str, Any]:
    compute = phases.get("compute", phases["total"])
    compute_rate = batch * len(compute) / float(compute.sum())
    achieved = compute_rate * flops / 1e12
    row = {"batch": batch, "status": "ok", "images_per_s": batch * len(phases["total"]) / float(phases["total"].sum()),
           "compute_images_per_s": compute_rate, "achieved_tflops": achieved,
           "fraction_of_peak": achieved / peak_tflops if peak_tflops else None,
           "first_call_s": first_call_s, "latency_ms": summarize(phases["total"])}  # fmt: skip
    row.update({f"{name}_ms": summarize(v) for name, v in phases.items() if name != "total"})
    return row


def _watchdog(rec: Recorder, seconds: float) -> threading.Timer:
    def stop() -> None:
        rec.save(stopped=f"watchdog: still running {seconds:.0f} s after the start; results so far kept")
        os._exit(3)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    return timer


def run(out: Path, device: str, tiny: bool, budget_s: float, batch_sizes: list[int], duration_s: float) -> dict[str, Any]:
    import torch

    start = time.monotonic()
    deadline = start + budget_s
    reason = cuda_unavailable_reason()
    if device == "cuda" and reason is not None:
        raise click.ClickException(f"--device cuda: {reason} (use --device cpu --tiny for a smoke run)")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "device": device, "tiny": tiny, "budget_s": budget_s, "load_start": load(),
        "conventions": "latency: per-iteration CUDA-event times (wall on CPU), nearest-rank percentiles; "
                       "fraction_of_peak: compute-only images/s x FLOPs per image / matmul peak of the same precision",
        "peaks": [], "models": [], "unavailable": [],
    }  # fmt: skip
    if device == "cuda":
        # Shapes are fixed per cell, so cuDNN may time its algorithms once (in the warm-up) and keep the fastest.
        torch.backends.cudnn.benchmark = True
        report["cudnn_benchmark"] = True
    rec = Recorder(out, report)
    rec.save()
    watchdog = _watchdog(rec, budget_s + WATCHDOG_GRACE_S)
    try:
        _measure_all(report, rec, device, tiny, deadline, batch_sizes, duration_s, reason)
    finally:
        watchdog.cancel()  # the caller (a test, say) outlives the run
    rec.save(load_end=load(), seconds=time.monotonic() - start, stopped=None)
    return report


def _measure_all(report: dict[str, Any], rec: Recorder, device: str, tiny: bool, deadline: float,
                 batch_sizes: list[int], duration_s: float, reason: str | None) -> None:  # fmt: skip
    n = 256 if tiny else 8192
    precisions = ("fp32", "tf32", "fp16", "bf16") if device == "cuda" else ("fp32",)
    for precision in precisions:
        report["peaks"].append(matmul_peak(device, precision, n, 0.05 if tiny else 0.5))
        rec.save()
    peaks = {p["precision"]: p["tflops"] for p in report["peaks"]}
    variants = CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS
    if device == "cpu":
        report["unavailable"] = [{"variant": v, "reason": reason or "--device cpu"} for v in CUDA_VARIANTS]
    opts = {"device": device, "batch_sizes": batch_sizes, "warmup_ms": 10 if tiny else 100,
            "duration_s": duration_s, "min_iters": 3 if tiny else 10}  # fmt: skip
    models = list((TINY_MODELS if tiny else MODELS).items())
    for i, (backbone, size) in enumerate(models):
        # An equal share of what is left, so the first model cannot starve the second.
        share = (deadline - time.monotonic()) / (len(models) - i)
        try:
            bench_model(backbone, size, variants, opts, time.monotonic() + share, peaks, rec)
        except Exception as exc:  # noqa: BLE001 - e.g. a backbone package missing on the device image
            report["models"].append({"backbone": backbone, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
        rec.save()


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON report, rewritten after every cell.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--tiny", is_flag=True, help="The small backbone at 32 px and a 256 matmul: a smoke run of the whole script.")
@click.option("--budget-s", default=270.0, show_default=True, help="Hard limit on the whole run.")
@click.option("--batch-sizes", default=None, callback=lambda c, p, v: _ints(c, p, v) if v else None,
              help="Default 1,8,32,64,128,256 (1,2 with --tiny).")
@click.option("--duration-s", default=None, type=float, help="Timed seconds per cell (default 0.4; 0.05 with --tiny).")
def main(out: str, device: str, tiny: bool, budget_s: float, batch_sizes: list[int] | None, duration_s: float | None) -> None:
    """Measure PyTorch encoding on this GPU within the budget; write JSON as it goes."""
    batch_sizes = batch_sizes or ([1, 2] if tiny else [1, 8, 32, 64, 128, 256])
    report = run(Path(out), device, tiny, budget_s, batch_sizes, duration_s or (0.05 if tiny else 0.4))
    for model in report["models"]:
        for v in model.get("variants", []):
            for row in v["rows"]:
                if row["status"] == "ok":
                    frac = row["fraction_of_peak"]
                    click.echo(f"{model['backbone']:<20} {v['variant']:<28} batch {row['batch']:>4}: "
                               f"{row['compute_images_per_s']:>10,.0f} img/s"
                               + (f" ({100 * frac:.0f}% of peak)" if frac is not None else ""))  # fmt: skip
    click.echo(f"wrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
