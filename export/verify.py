"""Is an exported model the trained one? Graph checks, then its codes against PyTorch's.

1. The ONNX file: `onnx.checker` full check; strict shape inference with type checks, which must
   give `codes` uint8 [N, ceil(k/8)] (and `u` float [N, k]).
2. Bits: the candidate runner (ONNX Runtime, TensorRT) and the PyTorch reference run the same
   uint8 batches, random noise and rendered scenes (or images from a folder), at batch 1, 3 and
   17. Every flipped bit is reported with the reference's |u| there: a flip where |u| is tiny
   is rounding; a flip where |u| is large is a broken export. The candidate's packed bytes must
   also equal `pack(binarize(u))` of its own u, when it has u.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dsah_rt.codes import binarize, pack, unpack
from dsah_rt.errors import UserError
from dsah_rt.runners.base import ModelInfo, Runner, check_output_contract

BATCHES = (1, 3, 17)


class VerifyError(UserError):
    """The exported model disagrees with PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Flipped bits allowed: a fraction of all bits compared, and how far from 0 a flip's u may be.

    `margin` is relative to the largest |u| of the reference in that batch, so it does not depend
    on the scale the hash layer happens to have.
    """

    flip_fraction: float
    margin: float


# fp32 engines differ from PyTorch only by summation order; fp16/bf16 ones round every
# activation (bf16 keeps 8 mantissa bits against fp16's 11).
TOLERANCES = {"fp32": Tolerance(1e-3, 1e-3), "fp16": Tolerance(1e-2, 2e-2), "bf16": Tolerance(2e-2, 5e-2)}


def check_onnx_graph(path: str | os.PathLike[str], info: ModelInfo) -> dict[str, Any]:
    """onnx.checker (full) and strict shape inference; the inferred outputs must be the promised ones."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(
            onnx.load(str(path)), check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerifyError(f"{path}: ONNX check failed: {' '.join(str(exc).split())[:400]}") from None
    outputs = {}
    for value in inferred.graph.output:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        outputs[value.name] = (onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)
    check_output_contract(outputs, info, str(path))
    return {"checker": "ok (full_check)", "shape_inference": "ok (strict)", "outputs": outputs}


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def scene_images(n: int, size: int, seed: int) -> np.ndarray:
    """Rendered photo-like scenes (synthetic-fg: smooth backgrounds, shapes, an object), NCHW uint8."""
    from dsah_rt.train.data.synthetic_fg import class_glyphs, generate

    glyphs = class_glyphs(10)
    split = generate(np.random.default_rng(seed), np.arange(n) % 10, size, glyphs)
    return np.ascontiguousarray(split.images.transpose(0, 3, 1, 2))


def folder_images(folder: str | os.PathLike[str], n: int, size: int) -> np.ndarray:
    """Up to `n` images decoded from `folder` (cycled if it has fewer), NCHW uint8."""
    from dsah_rt.encode import decoded_chunks
    from dsah_rt.images import scan

    found = scan(folder)
    decoded = [imgs for _, imgs, _ in decoded_chunks(found.root, found.files[: 4 * n], size, 64, 1, "thread")]
    images = np.concatenate(decoded) if decoded else np.zeros((0, 3, size, size), np.uint8)
    if not len(images):
        raise UserError(f"{folder}: no decodable image to verify with")
    return images[np.arange(n) % len(images)]


def compare(reference: Runner, candidate: Runner, images: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Bits of `candidate` against `reference` on one batch; see the module docstring."""
    ref_codes, ref_u = reference.infer_with_u(images)
    if candidate.info.with_u:
        codes, u = candidate.infer_with_u(images)
        packing_ok = bool(np.array_equal(codes, pack(binarize(u))))
        u_diff = float(np.abs(u.astype(np.float64) - ref_u).max())
    else:
        codes, packing_ok, u_diff = candidate.infer(images), True, None
    bits = candidate.info.bits
    flipped = unpack(codes, bits) != unpack(ref_codes, bits)
    scale = float(np.abs(ref_u).max()) or 1.0
    margins = np.sort(np.abs(ref_u[flipped]))[::-1] / scale
    return {
        "batch": len(images),
        "bits": int(flipped.size),
        "flipped": int(flipped.sum()),
        "agreement": 1.0 - float(flipped.mean()),
        "max_flip_margin": float(margins[0]) if len(margins) else 0.0,
        "flip_margins": [round(float(m), 8) for m in margins[:20]],
        "max_u_diff": u_diff,
        "packing_ok": packing_ok,
        "reference_packing_ok": bool(np.array_equal(ref_codes, pack(binarize(ref_u)))),
        "margin_ok": bool(not len(margins) or margins[0] <= tol.margin),
    }


def verify_runner(
    candidate: Runner,
    reference: Runner,
    tolerance: Tolerance,
    real_images: np.ndarray | None = None,
    batches: tuple[int, ...] = BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare on random and real images at each batch size; the report's `ok` says whether it passed.

    `real_images` (NCHW uint8) defaults to rendered scenes at the model's input size.
    """
    size = candidate.info.input_size
    problems = []
    for field in ("bits", "input_size", "fingerprint"):
        if getattr(candidate.info, field) != getattr(reference.info, field):
            problems.append(f"{field} {getattr(candidate.info, field)} != reference {getattr(reference.info, field)}")
    if problems:
        return {"ok": False, "problems": problems, "cases": []}
    need = sum(batches)
    real = scene_images(need, size, seed) if real_images is None else real_images[np.arange(need) % len(real_images)]
    sources = {"random": random_images(need, size, seed), "real": real}
    cases = []
    for name, pool in sources.items():
        offset = 0
        for n in batches:
            cases.append({"images": name, **compare(reference, candidate, pool[offset : offset + n], tol=tolerance)})
            offset += n
    total_bits = sum(c["bits"] for c in cases)
    total_flips = sum(c["flipped"] for c in cases)
    if total_flips > tolerance.flip_fraction * total_bits:
        allowed = tolerance.flip_fraction
        problems.append(f"{total_flips} of {total_bits} bits flipped, over the allowed fraction {allowed:g}")
    if not all(c["margin_ok"] for c in cases):
        worst = max(c["max_flip_margin"] for c in cases)
        problems.append(
            f"a bit flipped where the reference's |u| is {worst:.3g} of its largest (allowed {tolerance.margin:g})"
        )
    if not all(c["packing_ok"] and c["reference_packing_ok"] for c in cases):
        problems.append("packed codes differ from pack(binarize(u))")
    return {
        "ok": not problems,
        "problems": problems,
        "agreement": 1.0 - total_flips / total_bits,
        "flipped": total_flips,
        "bits_compared": total_bits,
        "tolerance": {"flip_fraction": tolerance.flip_fraction, "margin": tolerance.margin},
        "candidate": candidate.describe(),
        "reference": reference.describe(),
        "cases": cases,
    }


def format_report(report: dict[str, Any]) -> str:
    """A table of the cases and the verdict, for the CLI."""
    lines = [f"{'images':<8}{'batch':>6}{'bits':>8}{'flipped':>9}{'agreement':>11}{'max flip |u|':>14}{'max |du|':>11}"]
    for c in report["cases"]:
        du = "-" if c["max_u_diff"] is None else f"{c['max_u_diff']:.2e}"
        lines.append(
            f"{c['images']:<8}{c['batch']:>6}{c['bits']:>8}{c['flipped']:>9}{c['agreement']:>11.6f}"
            f"{c['max_flip_margin']:>14.2e}{du:>11}"
        )
    verdict = "PASS" if report["ok"] else "FAIL: " + "; ".join(report["problems"])
    if report["cases"]:
        verdict += f" (agreement {report['agreement']:.6f} over {report['bits_compared']} bits)"
    return "\n".join([*lines, verdict])


def precision_of(runner: Runner) -> str:
    """'fp32', 'fp16' or 'bf16': which tolerance a runner's results are held to."""
    precision = str(runner.describe().get("precision") or "fp32")
    return next((p for p in ("fp16", "bf16") if p in precision), "fp32")


def verify_model(
    model_path: str | os.PathLike[str],
    reference: Runner,
    backend: str = "ort-cpu",
    images_dir: str | os.PathLike[str] | None = None,
    tolerance: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Graph checks (ONNX files) and `verify_runner` of the model at `model_path` on `backend`.

    Real images come from `images_dir` when given. The tolerance is the one of the runner's
    precision (TOLERANCES), with the fields in `tolerance` (flip_fraction, margin) replaced.
    """
    from dsah_rt.runners import make_runner, model_kind

    path = Path(model_path)
    with make_runner(path, backend) as candidate:
        graph = check_onnx_graph(path, candidate.info) if model_kind(path) == "onnx" else None
        real = None if images_dir is None else folder_images(images_dir, sum(BATCHES), candidate.info.input_size)
        tol = replace(TOLERANCES[precision_of(candidate)], **(tolerance or {}))
        report = verify_runner(candidate, reference, tol, real)
    report["graph"] = graph
    return report
