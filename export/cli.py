"""`dsah-rt export` and `dsah-rt verify`. torch, onnx and tensorrt are imported inside the commands."""

from __future__ import annotations

import click

_images_option = click.option(
    "--images", type=click.Path(exists=True, file_okay=False), default=None,
    help="Folder of real images to verify with (default: rendered scenes).",
)  # fmt: skip


def _tolerance(flip_fraction: float | None, margin: float | None) -> dict[str, float]:
    """Overrides of the precision's default tolerance, from the command line."""
    given = {"flip_fraction": flip_fraction, "margin": margin}
    return {key: value for key, value in given.items() if value is not None}


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
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
def export(run_dir, out, bits, with_u, engine, precision, max_batch, timing_cache, images, max_flip_fraction, max_flip_margin, report) -> None:
    """Export a trained run as ONE model: uint8 images in, packed codes out; verified against PyTorch."""
    from pathlib import Path

    from dsah_rt.atomic import check_parent, write_json
    from dsah_rt.export.pipeline import export_run

    check_parent(report)
    reports = export_run(
        run_dir, out, bits=bits, with_u=with_u, images_dir=images,
        tolerance=_tolerance(max_flip_fraction, max_flip_margin),
        trt=engine, precision=precision, max_batch=max_batch, timing_cache=timing_cache,
    )  # fmt: skip
    onnx_report = reports["onnx"]
    info = onnx_report["candidate"]
    size_mb = Path(out).stat().st_size / 1e6
    click.echo(
        f"wrote {out} ({size_mb:.1f} MB; {info['bits']} bits, {info['input_size']} px input; torch.onnx dynamo exporter)"
    )
    click.echo(
        f"verified against PyTorch: agreement {onnx_report['agreement']:.6f} over {onnx_report['bits_compared']} bits, "
        f"{onnx_report['flipped']} flipped"
    )
    if "engine" in reports:
        side = reports["engine"]["sidecar"]
        click.echo(
            f"wrote {engine} (TensorRT {side['tensorrt_version']}, {side['gpu_name']} sm {side['compute_capability']}, "
            f"{precision}); agreement {reports['engine']['agreement']:.6f}"
        )
    if report:
        write_json(report, reports)


@click.command("verify")
@click.argument("model", type=click.Path(exists=True))
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The training run it was exported from.")
@click.option("--bits", type=int, default=None, help="Code length, for a RUN_DIR holding several.")
@click.option("--backend", default="auto", show_default=True, help="Runner for MODEL: auto, ort-cpu, ort-cuda, ort-tensorrt, trt.")
@_images_option
@click.option("--max-flip-fraction", type=float, default=None, help="Flipped bits allowed (fraction).")
@click.option("--max-flip-margin", type=float, default=None, help="Largest |u| of a flipped bit, relative to max |u|.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
def verify(model, run_dir, bits, backend, images, max_flip_fraction, max_flip_margin, json_out) -> None:
    """Check MODEL against the PyTorch run: ONNX checker, shape inference, bits at batch 1, 3 and 17."""
    from dsah_rt.atomic import check_parent, write_json
    from dsah_rt.export.verify import VerifyError, format_report, verify_model
    from dsah_rt.runners.torch_runner import TorchRunner

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
