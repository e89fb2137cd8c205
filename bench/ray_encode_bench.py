"""`encode --engine ray` against the single-process encoder on the same folder and cores.

    python -m dsah_rt.bench.ray_encode_bench [--images 500] [--repeat 2] [--json OUT]

The small backbone (64 px, 48 bits) exported to ONNX, run on ONNX Runtime CPU, over generated
JPEGs. Three figures, the best of `--repeat` runs each: the single process (decode threads, one
per core), Ray started cold by the call (what one CLI run pays: `ray.init`, actor start-up,
shutdown) and Ray already running (the pipeline alone). Their difference is Ray's start-up
overhead; the warm figure against the single process is its steady-state cost or gain. Every
Ray run's codes are checked equal to the single process's. The load average is recorded before
and after: other processes share the cores.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.atomic import write_json
from dsah_rt.bench.encode_bench import export, make_jpegs
from dsah_rt.bench.timing import load
from dsah_rt.encode import EncodeResult, encode_folder
from dsah_rt.ray_encode import encode_ray
from dsah_rt.runners import make_runner


def _best(runs: list[EncodeResult]) -> dict[str, Any]:
    seconds = min(r.seconds for r in runs)
    return {"seconds": [round(r.seconds, 3) for r in runs], "images_s": len(runs[0].rows) / seconds}


def run_benchmark(work: Path, images: int, repeat: int) -> dict[str, Any]:
    import ray

    folder = work / "images"
    make_jpegs(folder, images, 48, 320)
    _, onnx_path, _ = export(work, "small")
    cores = os.cpu_count() or 1
    report: dict[str, Any] = {"images": images, "cores": cores, "load_start": load()}
    with make_runner(onnx_path, "ort-cpu") as runner:
        single = [encode_folder(folder, work / f"single{i}.parquet", runner, batch=32, workers=cores) for i in range(repeat)]
        ray_args = {"runner": runner, "model_path": onnx_path, "backend": "ort-cpu", "batch": 32}
        cold = [encode_ray(folder, work / f"cold{i}.parquet", **ray_args) for i in range(repeat)]
        ray.init(num_cpus=cores, include_dashboard=False)
        try:
            warm = [encode_ray(folder, work / f"warm{i}.parquet", **ray_args) for i in range(repeat)]
        finally:
            ray.shutdown()
    for result in [*cold, *warm]:
        assert result.rows == single[0].rows and np.array_equal(result.codes, single[0].codes), "codes differ"
    report["single_process"] = _best(single)
    report["ray_cold"] = _best(cold)
    report["ray_warm"] = _best(warm)
    report["ray_startup_overhead_s"] = min(r.seconds for r in cold) - min(r.seconds for r in warm)
    report["warm_over_single"] = report["ray_warm"]["images_s"] / report["single_process"]["images_s"]
    report["load_end"] = load()
    return report


@click.command()
@click.option("--images", type=int, default=500, show_default=True, help="Generated JPEGs to encode.")
@click.option("--repeat", type=int, default=2, show_default=True, help="Runs of each engine; the best counts.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default="bench/results/ray-encode.json", show_default=True)
def main(images: int, repeat: int, json_out: str) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsah-ray-bench-") as tmp:
        report = run_benchmark(Path(tmp), images, repeat)
    report |= {"seconds": time.perf_counter() - start, "date": dt.date.today().isoformat(), "machine": platform.machine()}
    write_json(json_out, report)
    click.echo(
        f"{images} images, {report['cores']} cores: single {report['single_process']['images_s']:.0f} images/s, "
        f"ray warm {report['ray_warm']['images_s']:.0f}, ray cold {report['ray_cold']['images_s']:.0f} "
        f"(start-up {report['ray_startup_overhead_s']:.1f} s); load {report['load_start']} -> {report['load_end']}"
    )


if __name__ == "__main__":
    main()
