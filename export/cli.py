"""`dsah-rt export` and `dsah-rt verify`. torch, onnx and tensorrt are imported inside the commands."""

from __future__ import annotations

from typing import Any

import click

from dsah_rt.cli_options import backend_option

_images_option = click.option(
    "--images", type=click.Path(exists=True, file_okay=False), default=None,
    help="Folder of real images to verify with (default: rendered scenes).",
)  # fmt: skip


def _tolerance(flip_fraction: float | None, margin: float | None) -> dict[str, float]:
    """Overrides of the precision's default tolerance, from the command line."""
    given = {"flip_fraction": flip_fraction, "margin": margin}
    return {key: value for key, value in given.items() if value is not None}


@click.command("export")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The ONNX file to write (from a RUN_DIR).")
@click.option("--bits", type=int, default=None, help="Code length, for a RUN_DIR holding several (bits-K sub-runs).")
@click.option("--with-u", is_flag=True, help="Add the real-valued u as a second output, for diagnostics.")
@click.option("--trt", "engine", type=click.Path(dir_okay=False), default=None, help="Also build this TensorRT engine.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True, help="Engine precision (min-max and sign stay fp32).")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Largest batch of the engine's profile.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="TensorRT timing cache, read and updated.")
@_images_option
@click.option("--max-flip-fraction", type=float, default=None, help="Verification: flipped bits allowed (fraction).")
@click.option("--max-flip-margin", type=float, default=None, help="Verification: largest |u| of a flipped bit, relative to max |u|.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the verification report as JSON.")
def export(source, out, bits, with_u, engine, precision, max_batch, timing_cache, images, max_flip_fraction, max_flip_margin, report) -> None:
    """Export a trained run as ONE model: uint8 images in, packed codes out; verified against PyTorch.

    SOURCE is the RUN_DIR (with --out, and --trt for an engine too), or a model.onnx exported with
    --with-u (with --trt only): its engine is then verified against ONNX Runtime instead.
    """
    from pathlib import Path

    from dsah_rt.atomic import check_parent, write_json
    from dsah_rt.errors import UserError
    from dsah_rt.export.pipeline import export_engine, export_run

    check_parent(report)
    tolerance = _tolerance(max_flip_fraction, max_flip_margin)
    if Path(source).is_file():
        run_only = [flag for flag, value in (("--out", out), ("--bits", bits), ("--with-u", with_u)) if value]
        if run_only:
            raise UserError(f"{source} is a model file; {', '.join(run_only)} apply only to a RUN_DIR")
        if engine is None:
            raise UserError(f"{source} is a model file: pass --trt ENGINE to build its TensorRT engine")
        reports = {"engine": export_engine(source, engine, precision, max_batch, timing_cache, images, tolerance)}
    elif out is None:
        raise UserError("--out (the ONNX file to write) is needed when exporting a RUN_DIR")
    else:
        reports = export_run(
            source, out, bits=bits, with_u=with_u, images_dir=images, tolerance=tolerance,
            trt=engine, precision=precision, max_batch=max_batch, timing_cache=timing_cache,
        )  # fmt: skip
    if "onnx" in reports:
        _echo_onnx(out, reports["onnx"])
    if "engine" in reports:
        built = reports["engine"]
        side = built["sidecar"]
        click.echo(
            f"wrote {engine} (TensorRT {side['tensorrt_version']}, {side['gpu_name']} sm {side['compute_capability']}, "
            f"{precision}); agreement {built['agreement']:.6f} against {built['reference']['backend']}"
        )
    if report:
        write_json(report, reports)


def _echo_onnx(out: str, onnx_report: dict[str, Any]) -> None:
    from pathlib import Path

    info = onnx_report["candidate"]
    size_mb = Path(out).stat().st_size / 1e6
    click.echo(
        f"wrote {out} ({size_mb:.1f} MB; {info['bits']} bits, {info['input_size']} px input; torch.onnx dynamo exporter)"
    )
    click.echo(
        f"verified against PyTorch: agreement {onnx_report['agreement']:.6f} over {onnx_report['bits_compared']} bits, "
        f"{onnx_report['flipped']} flipped"
    )


@click.command("verify")
@click.argument("model", type=click.Path(exists=True))
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The training run it was exported from.")
@click.option("--bits", type=int, default=None, help="Code length, for a RUN_DIR holding several.")
@backend_option("MODEL")
@_images_option
@click.option("--max-flip-fraction", type=float, default=None, help="Flipped bits allowed (fraction).")
@click.option("--max-flip-margin", type=float, default=None, help="Largest |u| of a flipped bit, relative to max |u|.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def verify(model, run_dir, bits, backend, images, max_flip_fraction, max_flip_margin, json_out) -> None:
    """Check MODEL against the PyTorch run: ONNX checker, shape inference, bits at batch 1, 3 and 17."""
    from dsah_rt.atomic import check_parent, write_json
    from dsah_rt.export.verify import VerifyError, format_report, verify_model
    from dsah_rt.export.torch_runner import TorchRunner

    check_parent(json_out)
    with TorchRunner.from_run(run_dir, bits=bits) as reference:
        report = verify_model(
            model, reference, backend, images, _tolerance(max_flip_fraction, max_flip_margin)
        )
    if json_out:
        write_json(json_out, report)
    if report.get("graph"):
        click.echo(f"onnx.checker: {report['graph']['checker']}; shape inference: {report['graph']['shape_inference']}")
    if report["cases"]:
        click.echo(f"{report['candidate']['backend']} {report['candidate'].get('providers') or report['candidate'].get('device')} vs torch")
    click.echo(format_report(report))
    if not report["ok"]:
        raise VerifyError(f"{model} does not match {run_dir}")
