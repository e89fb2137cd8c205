"""Export and encode benchmark: every ratio from one run on this machine.

    python -m dsah_rt.bench.encode_bench [--quick] [--json OUT] [--md OUT]

1. ONNX Runtime (CPU) against PyTorch eager (CPU) on the same exported model, DSaH on
   efficientnet_lite0 (ImageNet weights, 224 px) and on the small backbone (64 px), batch 1
   and 32, with the bit agreement of their codes. Both get the same thread count, 1 and then
   `--threads`: on a loaded machine torch's intra-op threads wait on each other, so one thread
   can be its faster setting. Timings are interleaved so a change of machine load hits both.
2. `encode` end to end on a folder of generated JPEGs of mixed sizes, against the decoder alone
   (same workers, no model) and the engine alone (pre-decoded batches), for both models, and the
   decode pool as threads and as processes.
3. Peak memory (VmHWM) of `dsah-rt encode` as a subprocess on N and 10 N images (10 N made of
   hard links to the N files, so generation stays quick while the decoder still reads 10 N files).

The load average is recorded before and after each part: other processes share the cores.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.atomic import write_report
from dsah_rt.bench.timing import load, seconds
from dsah_rt.omp import passive_openmp
from dsah_rt.codes import unpack
from dsah_rt.encode import decoded_chunks, encode_folder
from dsah_rt.images import scan
from dsah_rt.runners import make_runner

MODELS = {"efficientnet_lite0": ("imagenet", 224), "small": ("none", 64)}
BITS = 48


def export(work: Path, backbone: str) -> tuple[Path, Path, float]:
    from dsah_rt.bench.sample_run import make_run
    from dsah_rt.export.pipeline import export_run

    weights, size = MODELS[backbone]
    run = make_run(work / f"run-{backbone}", backbone, BITS, size, weights)
    onnx_path = work / f"{backbone}.onnx"
    start = time.perf_counter()
    export_run(run, onnx_path)  # verified against PyTorch at batch 1, 3, 17 or it raises
    return run, onnx_path, time.perf_counter() - start


def ort_vs_torch(run: Path, onnx_path: Path, size: int, threads: int, repeat: int, quick: bool) -> list[dict[str, Any]]:
    import torch

    from dsah_rt.export.verify import scene_images

    torch.set_num_threads(threads)
    rows = []
    with make_runner(onnx_path, "ort-cpu", threads=threads) as ort, make_runner(run, "torch") as ref:
        for batch in (1, 32):
            images = scene_images(batch, size, seed=batch)
            for runner in (ort, ref):
                runner.infer(images)  # warm-up: allocations, oneDNN primitive creation
            reps = repeat if batch > 1 else 2 * repeat
            t_ort, t_torch = [], []
            for _ in range(reps):  # interleaved, so load changes hit both
                t_ort.append(seconds(lambda: ort.infer(images)))
                t_torch.append(seconds(lambda: ref.infer(images)))
            check = scene_images(32 if quick else 128, size, seed=7)
            a, b = ort.infer(check), ref.infer(check)
            agree = 1.0 - float((unpack(a, BITS) != unpack(b, BITS)).mean())
            rows.append({
                "threads": threads,
                "batch": batch,
                "ort_ms": 1e3 * float(np.median(t_ort)),
                "torch_ms": 1e3 * float(np.median(t_torch)),
                "speedup": float(np.median(t_torch) / np.median(t_ort)),
                "ort_images_s": batch / float(np.median(t_ort)),
                "torch_images_s": batch / float(np.median(t_torch)),
                "bit_agreement": agree,
                "bits_compared": int(a.shape[0] * BITS),
            })  # fmt: skip
    return rows


def make_jpegs(folder: Path, n: int, low: int, high: int, seed: int = 0) -> None:
    """n JPEGs of sides in [low, high]: smooth colour fields plus grain, photo-like to the encoder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        field = coarse.resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 8, (h, w, 3))
        pixels = np.clip(np.asarray(field, np.float32) + grain, 0, 255).astype(np.uint8)
        sub = folder / f"d{i % 10}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{i:05d}.jpg", quality=90)


def encode_rates(
    folder: Path, onnx_path: Path, size: int, workers: int, engine_images: int, pools: tuple[str, ...]
) -> dict[str, Any]:
    """images/s of the decoder alone, the engine alone (on `engine_images`) and `encode` end to end."""
    found = scan(folder)
    n = len(found.files)
    out: dict[str, Any] = {"images": n, "workers": workers}
    for pool in ("thread", "process"):
        start = time.perf_counter()
        decoded = sum(len(imgs) for _, imgs, _ in decoded_chunks(found.root, found.files, size, 32, workers, pool))
        out[f"decoder_{pool}_images_s"] = decoded / (time.perf_counter() - start)
    batches = [imgs for _, imgs, _ in decoded_chunks(found.root, found.files[:engine_images], size, 32, workers)]
    with make_runner(onnx_path, "ort-cpu") as runner:
        runner.infer(batches[0])
        start = time.perf_counter()
        for imgs in batches:
            runner.infer(imgs)
        out["engine_images_s"] = sum(len(b) for b in batches) / (time.perf_counter() - start)
        for pool in pools:
            with tempfile.TemporaryDirectory() as tmp:
                result = encode_folder(folder, Path(tmp) / "codes.npy", runner, batch=32, workers=workers, pool=pool)
            out[f"end_to_end_{pool}_images_s"] = len(result.rows) / result.seconds
    slower = min(out["decoder_thread_images_s"], out["engine_images_s"])
    out["end_to_end_over_slower"] = out["end_to_end_thread_images_s"] / slower
    return out


_HWM_SCRIPT = """
import sys
from dsah_rt.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            print("HWM_KB", line.split()[1], file=sys.stderr)
"""


def peak_memory(folder: Path, onnx_path: Path, out: Path) -> dict[str, Any]:
    """VmHWM of `dsah-rt encode` (thread pool: one process holds everything) and its wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _HWM_SCRIPT, "encode", str(folder), "--out", str(out), "--model", str(onnx_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    hwm = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("HWM_KB"))
    n = len(scan(folder).files)
    return {"images": n, "peak_rss_mb": hwm / 1024, "seconds": seconds, "images_s": n / seconds}


def link_copies(src: Path, dst: Path, copies: int) -> None:
    for c in range(copies):
        for path in src.rglob("*.jpg"):
            target = dst / f"copy{c}" / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def run_benchmark(quick: bool, threads: int, work: Path) -> dict[str, Any]:
    n_images = 200 if quick else 2000
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
        "threads": threads,
        "load_start": load(),
    }
    models = {}
    for backbone, (_, size) in MODELS.items():
        run, onnx_path, export_s = export(work, backbone)
        models[backbone] = (run, onnx_path, size)
        report.setdefault("export_seconds", {})[backbone] = export_s

    report["ort_vs_torch"] = {}
    for backbone, (run, onnx_path, size) in models.items():
        before = load()
        repeat = 3 if quick else 5
        rows = [row for t in sorted({1, threads}) for row in ort_vs_torch(run, onnx_path, size, t, repeat, quick)]
        part = {"input_size": size, "load_before": before, "rows": rows, "load_after": load()}
        report["ort_vs_torch"][backbone] = part

    mixed = work / "mixed"
    start = time.perf_counter()
    make_jpegs(mixed, n_images, 48, 640)
    report["mixed_jpegs"] = {"images": n_images, "sides": [48, 640], "generate_seconds": time.perf_counter() - start}
    report["encode"] = {}
    for backbone, (_, onnx_path, size) in models.items():
        before = load()
        # lite0 is engine-bound on a CPU: a sample times the engine, and the pool
        # kind cannot matter end to end, so only the small model runs both pools end to end.
        lite = backbone == "efficientnet_lite0"
        pools = ("thread",) if lite else ("thread", "process")
        rates = encode_rates(mixed, onnx_path, size, threads, 128 if lite else n_images, pools)
        report["encode"][backbone] = {"input_size": size, "load_before": before, **rates, "load_after": load()}

    small = work / "small-jpegs"
    make_jpegs(small, n_images, 64, 128, seed=1)
    many = work / "many-jpegs"
    link_copies(small, many, 10)
    onnx_small = models["small"][1]
    report["memory"] = {
        "load_before": load(),
        "runs": [peak_memory(folder, onnx_small, work / f"mem{i}.npy") for i, folder in enumerate((small, many))],
        "load_after": load(),
    }
    report["load_end"] = load()
    return report


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"Measured {r['date']} on {r['machine']['cpus']} CPU cores (shared), {r['threads']} threads; "
             f"load average {r['load_start']} at the start, {r['load_end']} at the end.", "",
             "| model | threads | batch | ONNX Runtime ms | PyTorch ms | speedup | bit agreement |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for backbone, part in r["ort_vs_torch"].items():
        for row in part["rows"]:
            lines.append(
                f"| {backbone} ({part['input_size']} px) | {row['threads']} | {row['batch']} | {row['ort_ms']:.1f} "
                f"| {row['torch_ms']:.1f} "
                f"| {row['speedup']:.2f}x | {row['bit_agreement']:.5f} ({row['bits_compared']} bits) |"
            )
    lines += ["", f"`encode` on {r['mixed_jpegs']['images']} JPEGs of sides {r['mixed_jpegs']['sides'][0]}-"
              f"{r['mixed_jpegs']['sides'][1]} px, batch 32, {r['threads']} decode workers (images/s):", "",
              "| model | decoder alone (threads / processes) | engine alone | end to end (threads / processes) "
              "| end to end / slower |", "|---|---|---|---|---|"]  # fmt: skip
    for backbone, e in r["encode"].items():
        process = e.get("end_to_end_process_images_s")
        lines.append(
            f"| {backbone} ({e['input_size']} px) "
            f"| {e['decoder_thread_images_s']:.0f} / {e['decoder_process_images_s']:.0f} "
            f"| {e['engine_images_s']:.1f} | {e['end_to_end_thread_images_s']:.1f} / "
            f"{'-' if process is None else f'{process:.1f}'} "
            f"| {e['end_to_end_over_slower']:.2f} |"
        )
    lines += ["", "Peak memory of `dsah-rt encode` (small model, JPEGs of 64-128 px, thread pool):", "",
              "| images | peak RSS MB | seconds | images/s |", "|---|---|---|---|"]  # fmt: skip
    for m in r["memory"]["runs"]:
        lines.append(f"| {m['images']} | {m['peak_rss_mb']:.0f} | {m['seconds']:.1f} | {m['images_s']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--quick", is_flag=True, help="200 images instead of 2,000 (a smoke run).")
@click.option("--threads", default=2, show_default=True, help="Inference threads (both runtimes) and decode workers.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--md", "md_out", type=click.Path(dir_okay=False), help="Write the tables as markdown.")
def main(quick: bool, threads: int, json_out: str | None, md_out: str | None) -> None:
    omp_policy = passive_openmp()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsah-encode-bench-") as tmp:
        report = run_benchmark(quick, threads, Path(tmp))
    report["seconds"] = time.perf_counter() - start
    report["omp_wait_policy"] = omp_policy
    text = _markdown(report)
    click.echo(text + f"\n({report['seconds']:.0f} s)")
    write_report(report, text, json_out, md_out)


if __name__ == "__main__":
    main()
