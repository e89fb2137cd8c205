"""`dsah-rt export` as one library call: run -> verified model.onnx [-> verified model.engine].

The ONNX file is written beside `out` under a temporary name, verified against the PyTorch
reference, and only then renamed to `out`: a model that fails verification never appears
under the requested name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsah_rt.atomic import check_parent
from dsah_rt.export.onnx_export import export_onnx
from dsah_rt.export.verify import VerifyError, format_report, verify_model
from dsah_rt.runners.torch_runner import TorchRunner


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


def _build_and_verify_engine(
    onnx_path: Path,
    engine: str | os.PathLike[str],
    reference: TorchRunner,
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
        raise VerifyError(f"{engine}: engine does not match PyTorch; removed\n{format_report(report)}")
    return {"path": str(engine), "sidecar": sidecar, **report}
