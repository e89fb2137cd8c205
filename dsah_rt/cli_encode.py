"""`dsah-rt encode IMAGES --out codes.npy --model model.onnx`: a folder of images -> packed codes."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import click

from dsah_rt.cli_options import AtLeast, backend_option
from dsah_rt.errors import UserError, display_path
from dsah_rt.progress import ProgressBar

if TYPE_CHECKING:  # numpy and the runners load only when a command runs, not for --help
    from dsah_rt.runners.base import Runner


def check_input_size(runner: Runner, size: int | None) -> None:
    if size is not None and size != runner.info.input_size:
        raise UserError(
            f"{runner.source}: model takes {runner.info.input_size} px images but --size {size} was requested"
        )


@click.command("encode")
@click.argument("images", type=click.Path(exists=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="codes.npy or codes.parquet to write (+ its .json manifest).")
@click.option("--model", "model_path", required=True, type=click.Path(), help="model.onnx, model.engine or a RUN_DIR (torch).")
@backend_option()
@click.option("--batch", type=int, default=32, show_default=True, help="Images per inference call.")
@click.option("--workers", type=AtLeast(1), default=None, help="Decode workers; with --engine ray, runner actors (default: one per CPU core, or per GPU share).")
@click.option("--pool", type=click.Choice(["thread", "process"]), default="thread", show_default=True, help="Decode in threads (measured faster here) or processes.")
@click.option("--threads", type=AtLeast(1), default=None, help="Inference threads (ONNX Runtime CPU; default: its own choice).")
@click.option("--size", type=int, default=None, help="Refuse a model whose input size is not SIZE.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (codes.npy.partial) without re-encoding; with --engine ray, keep the rows already in --out.")
@click.option("--strict", is_flag=True, help="Fail (and write nothing) if any file is skipped.")
@click.option("--engine", type=click.Choice(["single", "ray"]), default="single", show_default=True, help="This process, or Ray Data (the `ray` extra).")
@click.option("--ray-address", default=None, help="With --engine ray: the cluster to join (auto, ray://HOST:PORT); default: a local Ray in-process.")
@click.option("--gpus-per-worker", type=float, default=0, help="With --engine ray: GPUs each runner actor reserves.")
def encode(images, out, model_path, backend, batch, workers, pool, threads, size, resume, strict, engine, ray_address, gpus_per_worker) -> None:
    """Encode every image under IMAGES; rows in sorted path order, skipped files listed with reasons.

    IMAGES is a folder or an image; with --engine ray also a .txt list, one path or URI (s3://...)
    a line, encoded in its order.
    """
    from dsah_rt.atomic import check_file_output
    from dsah_rt.encode import encode_folder
    from dsah_rt.runners import make_runner

    if engine != "ray" and (ray_address is not None or gpus_per_worker):
        raise UserError(f"{'--ray-address' if ray_address is not None else '--gpus-per-worker'} needs --engine ray")
    if engine != "ray":
        from dsah_rt.ray_encode import is_list_file

        if is_list_file(images):
            raise UserError(f"{display_path(images)}: a list of paths (.txt) is read by --engine ray only; pass --engine ray")
    check_file_output(out)
    with make_runner(model_path, backend, threads=threads) as runner:
        check_input_size(runner, size)
        described = runner.describe()
        where = described.get("providers") or described.get("device")
        click.echo(f"model: {runner.source} on {described['backend']} {where}", err=True)
        if runner.selection_note:
            click.echo(runner.selection_note, err=True)
        log = functools.partial(click.echo, err=True)
        with ProgressBar("encoding") as bar:
            if engine == "ray":
                result = _encode_ray(images, out, runner, model_path, backend, batch, workers, threads, resume, strict,
                                     ray_address, gpus_per_worker, bar.update, log)  # fmt: skip
            else:
                result = encode_folder(
                    images, out, runner, batch=batch, workers=workers, pool=pool, resume=resume, strict=strict,
                    progress=bar.update, log=log,
                )  # fmt: skip
    for skip in result.skipped[:20]:
        click.echo(f"skipped {display_path(skip.path)}: {skip.reason}", err=True)
    if len(result.skipped) > 20:
        click.echo(f"... and {len(result.skipped) - 20} more skipped (all listed in {out}.json)", err=True)
    click.echo(f"{result.summary()} -> {out}")


def _encode_ray(images, out, runner, model_path, backend, batch, workers, threads, resume, strict, address, gpus, progress, log):  # noqa: ANN001, ANN202
    try:
        import ray.data  # noqa: F401 - here, so a missing extra is one line, not a traceback mid-run
    except ImportError as exc:
        raise UserError(f"{out}: --engine ray needs Ray Data ({exc}); pip install 'dsah-rt[ray]'") from None
    from dsah_rt.ray_encode import encode_ray

    # One inference thread per actor unless asked: the actor pool is the parallelism.
    return encode_ray(
        images, out, runner, model_path, backend=backend, threads=threads or 1, batch=batch, workers=workers,
        gpus_per_worker=gpus, address=address, resume=resume, strict=strict, progress=progress, log=log,
    )  # fmt: skip
