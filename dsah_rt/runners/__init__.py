"""Runners: one interface over ONNX Runtime, TensorRT and the PyTorch reference.

`make_runner(path, backend)` picks the runner from the model file (model.onnx, model.engine or a
training RUN_DIR) and the backend name, activates it and returns it:

    with make_runner("model.onnx", backend="auto") as runner:
        print(runner.describe()["selected"])
        codes = runner.infer(images_uint8_nchw)

The backends are those registered (`registry.backend_names()`): ort-tensorrt, ort-cuda, ort-cpu
(ONNX Runtime providers, for an ONNX file), trt (a TensorRT engine) and torch (the reference; needs
the `train` extra and a RUN_DIR). `auto` tries the backends of the model's kind fastest first and
takes the first that starts here. Nothing here imports torch unless a RUN_DIR is run.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsah_rt.runners import ort, reference, trt  # noqa: F401 - importing a runner module registers it
from dsah_rt.runners.base import ModelError, ModelInfo, Runner
from dsah_rt.runners.registry import KINDS, backend_names, backends, get_backend

__all__ = ["ModelError", "ModelInfo", "Runner", "backend_names", "make_runner", "model_kind"]


def model_kind(path: str | os.PathLike[str]) -> str:
    """'run' (a training RUN_DIR), 'engine' (TensorRT: by suffix or sidecar) or 'onnx'."""
    path = Path(path)
    if path.is_dir():
        return "run"
    if path.suffix in trt.ENGINE_SUFFIXES or trt.sidecar_path(path).is_file():
        return "engine"
    return "onnx"


def _auto(path: Path, kind: str, threads: int | None, bits: int | None) -> Runner:
    notes = []
    for backend in backends(kind):
        reason = backend.unavailable()
        if reason is None:
            runner = backend.build(path, threads, bits)
            try:
                runner.activate()
            except ModelError as exc:
                reason = str(exc)
            else:
                runner.selection_note = f"auto chose {backend.name}" + (f" ({'; '.join(notes)})" if notes else "")
                return runner
        notes.append(f"{backend.name}: {reason}")
    raise ModelError(f"{path}: no backend could run this {kind} ({'; '.join(notes)})")


def make_runner(
    path: str | os.PathLike[str], backend: str = "auto", threads: int | None = None, bits: int | None = None
) -> Runner:
    """An activated runner for `path` on `backend`; see the module docstring. `bits` picks a sub-run of a RUN_DIR."""
    chosen = None if backend == "auto" else get_backend(backend)
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or run folder")
    kind = model_kind(path)
    if chosen is None:
        return _auto(path, kind, threads, bits)
    if chosen.kind != kind:
        what, how = KINDS[chosen.kind]
        others = ", ".join(["auto", *(b.name for b in backends(kind))])
        raise ModelError(
            f"{path} is {KINDS[kind][0]}, and --backend {backend} needs {what}{f' ({how})' if how else ''}; "
            f"backends for it: {others}"
        )
    runner = chosen.build(path, threads, bits)
    runner.activate()
    return runner
