"""`dsah-rt export` as one library call: run -> verified model.onnx [-> verified model.engine].

The ONNX file is written beside `out` under a temporary name, verified against the PyTorch
reference, and only then renamed to `out`: a model that fails verification never appears
under the requested name. `export_engine` builds from a model.onnx alone (a machine without the
run or torch), verifying the engine against ONNX Runtime on the CPU instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsah_rt.atomic import check_parent
from dsah_rt.errors import UserError
from dsah_rt.export.onnx_export import export_onnx
from dsah_rt.export.torch_runner import TorchRunner
from dsah_rt.export.verify import VerifyError, format_report, verify_model
from dsah_rt.runners import make_runner
from dsah_rt.runners.base import Runner


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bits: int | None = None,
    with_u: bool = False,
    images_dir: str | os.PathLike[str] | None = None,
    tolerance: dict[str, float] | None = None,
    trt: str | os.PathLike[str] | None = None,
    precision: str = "fp16",
    max_batch: int = 256,
    timing_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Export, verify and (with `trt`) build and verify an engine; return both reports.

    `tolerance` overrides fields of each model's precision tolerance (`verify.TOLERANCES`).
    Raises VerifyError, with the report table in its message, when a check fails.
    """
    out = Path(out)
    check_parent(out)
    if trt is not None:
        check_parent(trt)
    with TorchRunner.from_run(run_dir, bits=bits) as reference:
        staging = out.with_name(f".{out.name}.unverified")
        try:
            export_onnx(reference.fused.model, reference.config, reference.info.fingerprint, staging, with_u)
            report = verify_model(staging, reference, "ort-cpu", images_dir, tolerance)
            if not report["ok"]:
                raise VerifyError(f"{out}: exported model does not match PyTorch; not written\n{format_report(report)}")
            os.replace(staging, out)
        finally:
            staging.unlink(missing_ok=True)
        reports = {"onnx": {"path": str(out), **report}}
        if trt is not None:
            reports["engine"] = _build_and_verify_engine(
                out, trt, reference, precision, max_batch, timing_cache, images_dir, tolerance
            )
    return reports


def export_engine(
    onnx_path: str | os.PathLike[str],
    engine: str | os.PathLike[str],
    precision: str = "fp16",
    max_batch: int = 256,
    timing_cache: str | os.PathLike[str] | None = None,
    images_dir: str | os.PathLike[str] | None = None,
    tolerance: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Build `engine` from an exported model.onnx and verify it against ONNX Runtime (CPU) on that file.

    Flipped bits are judged by the reference's |u|, so the ONNX file must have been exported with u.
    """
    check_parent(engine)
    with make_runner(onnx_path, "ort-cpu") as reference:
        if not reference.info.with_u:
            raise UserError(
                f"{onnx_path}: has no output u, which verifying an engine against ONNX Runtime needs; "
                "export it with --with-u, or build from the RUN_DIR to verify against PyTorch"
            )
        return _build_and_verify_engine(
            Path(onnx_path), engine, reference, precision, max_batch, timing_cache, images_dir, tolerance
        )


def _build_and_verify_engine(
    onnx_path: Path,
    engine: str | os.PathLike[str],
    reference: Runner,
    precision: str,
    max_batch: int,
    timing_cache: str | os.PathLike[str] | None,
    images_dir: str | os.PathLike[str] | None,
    tolerance: dict[str, float] | None,
) -> dict[str, Any]:
    from dsah_rt.export.tensorrt_build import build_engine
    from dsah_rt.runners.trt import sidecar_path

    sidecar = build_engine(onnx_path, engine, precision, max_batch, timing_cache=timing_cache)
    report = verify_model(engine, reference, "trt", images_dir, tolerance)
    if not report["ok"]:
        Path(engine).unlink(missing_ok=True)
        sidecar_path(engine).unlink(missing_ok=True)
        what = f"its {reference.backend} reference"
        raise VerifyError(f"{engine}: engine does not match {what}; removed\n{format_report(report)}")
    return {"path": str(engine), "sidecar": sidecar, **report}
