"""Runners: one interface over ONNX Runtime, TensorRT and the PyTorch reference.

`make_runner(path, backend)` picks the runner from the model file (model.onnx, model.engine or a
training RUN_DIR) and the backend name, activates it and returns it:

    with make_runner("model.onnx", backend="auto") as runner:
        print(runner.describe()["selected"])
        codes = runner.infer(images_uint8_nchw)

Backends: auto, ort-cpu, ort-cuda, ort-tensorrt (ONNX Runtime providers), trt (a serialized
TensorRT engine) and torch (the reference; needs the `train` extra and a RUN_DIR). `auto` takes
the fastest one that starts here: an engine runs on TensorRT; an ONNX file on ONNX Runtime's
TensorRT provider, else CUDA, else the CPU; a RUN_DIR on PyTorch. Nothing here imports torch
unless the torch backend is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsah_rt.runners.base import ModelError, ModelInfo, Runner
from dsah_rt.runners.ort import OrtRunner, available_providers
from dsah_rt.runners.trt import TrtRunner, sidecar_path

__all__ = ["BACKENDS", "ModelError", "ModelInfo", "Runner", "make_runner", "model_kind"]

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-tensorrt", "trt", "torch")
# Fastest first: what `auto` tries for an ONNX file.
ORT_ORDER = ("tensorrt", "cuda", "cpu")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# model kind -> (backends that run it, what to tell someone who asked for another one)
KIND_BACKENDS = {
    "run": (("auto", "torch"), "export it first ('dsah-rt export RUN_DIR --out model.onnx')"),
    "engine": (("auto", "trt"), "a TensorRT engine runs only with --backend trt"),
    "onnx": (("auto", "ort-cpu", "ort-cuda", "ort-tensorrt"), "--backend torch needs the training RUN_DIR, trt a built engine"),
}


def model_kind(path: str | os.PathLike[str]) -> str:
    """'run' (a training RUN_DIR), 'engine' (TensorRT, with its sidecar) or 'onnx'."""
    path = Path(path)
    if path.is_dir():
        return "run"
    if path.suffix in ENGINE_SUFFIXES or sidecar_path(path).is_file():
        return "engine"
    return "onnx"


def _torch_runner(path: Path, bits: int | None) -> Runner:
    try:
        from dsah_rt.runners.torch_runner import TorchRunner
    except ImportError as exc:
        hint = "pip install 'dsah-rt[train]'"
        raise ModelError(f"the torch backend needs PyTorch ({exc.name} missing): {hint}") from None
    return TorchRunner.from_run(path, bits=bits)


def _auto_ort(path: Path, threads: int | None) -> Runner:
    have = available_providers()
    notes = []
    for provider in ORT_ORDER:
        if provider not in have:
            notes.append(f"{provider}: not in this onnxruntime build")
            continue
        runner = OrtRunner(path, provider, threads)
        try:
            runner.activate()
        except ModelError as exc:
            notes.append(f"{provider}: {exc}")
            continue
        runner.selection_note = f"auto chose onnxruntime/{provider}" + (f" ({'; '.join(notes)})" if notes else "")
        return runner
    raise ModelError(f"{path}: no onnxruntime provider could run it ({'; '.join(notes)})")


def make_runner(
    path: str | os.PathLike[str], backend: str = "auto", threads: int | None = None, bits: int | None = None
) -> Runner:
    """An activated runner for `path` on `backend`; see the module docstring. `bits` picks a sub-run of a RUN_DIR."""
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or run folder")
    kind = model_kind(path)
    runs_on, hint = KIND_BACKENDS[kind]
    if backend not in runs_on:
        raise ModelError(f"{path}: backend {backend} cannot run a {kind}; {hint}")
    if kind == "run":
        runner = _torch_runner(path, bits)
    elif kind == "engine":
        runner = TrtRunner(path)
    elif backend == "auto":
        return _auto_ort(path, threads)
    else:
        runner = OrtRunner(path, backend.removeprefix("ort-"), threads)
    runner.activate()
    if backend == "auto":
        runner.selection_note = f"auto chose {runner.backend} (the only backend for a {kind})"
    return runner
