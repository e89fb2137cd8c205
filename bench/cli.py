"""`dsah-rt bench` and `dsah-rt demo`: the command lines of `dsah_rt.bench.suite.run_bench` and
`dsah_rt.bench.demo.run_demo` (parse, call, print). Only click loads at import, so `--help` stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import click


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in values):
        raise click.BadParameter(f"every value must be at least 1, got {value!r}")
    return values


def _backends(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from dsah_rt.bench.backends import BY_NAME

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise click.BadParameter(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return names


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
    from dsah_rt.bench.report import text
    from dsah_rt.bench.suite import run_bench

    report = run_bench(model, run, bits, backends, batch_sizes, warmup_ms, duration_s, min_iters, threads,
                       retrieval_db, retrieval_queries, retrieval_bits, retrieval, isolate, json_out, md_out, plots,
                       log=lambda msg: click.echo(msg, err=True))  # fmt: skip
    click.echo(text(report))


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--epochs", type=int, default=None, help="Training epochs per method (default 60, the demo's budget); a run already in --out is continued.")
def demo(out: str, epochs: int | None) -> None:
    """The main job on embedded defaults: train, export, verify, encode, evaluate, benchmark."""
    from dsah_rt.bench.demo import run_demo
    from dsah_rt.omp import passive_openmp

    passive_openmp()  # before torch starts: spinning OpenMP threads stall a shared 2-core machine
    run_demo(Path(out), epochs=epochs)
