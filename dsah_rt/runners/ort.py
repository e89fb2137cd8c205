"""OrtRunner: an exported model.onnx on ONNX Runtime (CPU, CUDA or its TensorRT provider).

Registers ort-tensorrt, ort-cuda and ort-cpu, fastest first (the order `auto` tries them).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsah_rt.runners.base import ModelError, ModelInfo, Runner, check_output_contract
from dsah_rt.runners.registry import Backend, register

if TYPE_CHECKING:
    import numpy as np

# ONNX Runtime's tensor type names -> NumPy's, the names `check_output_contract` compares.
_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelError("running model.onnx needs onnxruntime (pip install 'dsah-rt[cpu]' or '[gpu]')") from exc
    return onnxruntime


def provider_unavailable_reason(provider: str) -> str | None:
    """None when this onnxruntime build has `provider` ('cpu', 'cuda', 'tensorrt'), else why not."""
    try:
        have = _ort().get_available_providers()
    except ModelError as exc:
        return str(exc)
    if PROVIDERS[provider] in have:
        return None
    return (
        f"onnxruntime {_ort().__version__} has no {PROVIDERS[provider]} (available: {', '.join(have)}); "
        "install onnxruntime-gpu for cuda/tensorrt"
    )


def read_onnx_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The dsah-rt metadata of an ONNX file, read without building a session's kernels."""
    session = _session(Path(path), ["CPUExecutionProvider"], threads=1, optimize=False)
    return _info_from_session(session, str(path))


def _session(path: Path, providers: list[Any], threads: int | None, optimize: bool = True) -> Any:
    ort = _ort()
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    options = ort.SessionOptions()
    if not optimize:  # a metadata read: skip graph rewrites, they cost more than the read itself
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # Idle intra-op threads otherwise spin between runs, taking the cores the decode workers (and
    # anyone sharing the machine) need: on a shared 2-core machine spinning slowed batch-1 runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # provider fallbacks are refused by SessionFromOnnx, not left to a log line
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX model ({first[:300]})") from None


def _info_from_session(session: Any, where: str) -> ModelInfo:
    info = ModelInfo.from_metadata(dict(session.get_modelmeta().custom_metadata_map), where)
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
        raise ModelError(f"{where}: expected one uint8 input 'images', found {[(i.name, i.type) for i in inputs]}")
    shape = inputs[0].shape
    if len(shape) != 4 or list(shape[1:]) != [3, info.input_size, info.input_size]:
        raise ModelError(
            f"{where}: graph input shape {shape} does not match the metadata's input size {info.input_size}"
        )
    outputs = {o.name: (_DTYPES.get(o.type, o.type), list(o.shape)) for o in session.get_outputs()}
    check_output_contract(outputs, info, where)
    return info


class SessionFromOnnx:
    """A lazy loader, in Polygraphy's style: calling it opens the session of `path` on `provider`.

    A GPU provider that ONNX Runtime cannot start is dropped with only a log line and the session
    runs on the CPU; that fallback is refused here, because a silent 50x slowdown is a bug.
    """

    def __init__(self, path: str | os.PathLike[str], provider: str = "cpu", threads: int | None = None) -> None:
        if provider not in PROVIDERS:
            raise ModelError(f"unknown onnxruntime provider {provider!r}; known: {', '.join(PROVIDERS)}")
        self.path = Path(path)
        self.provider = provider
        self.threads = threads

    def __call__(self) -> Any:
        reason = provider_unavailable_reason(self.provider)
        if reason is not None:
            raise ModelError(reason)
        session = _session(self.path, self._provider_list(), self.threads)
        used, wanted = session.get_providers(), PROVIDERS[self.provider]
        if used[0] != wanted:
            raise ModelError(
                f"{self.path}: asked for {wanted} but onnxruntime fell back to {used[0]} "
                "(driver, CUDA or TensorRT libraries missing?); refusing to run on the CPU silently"
            )
        return session

    def _provider_list(self) -> list[Any]:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # The TensorRT provider's profile must be given when the session opens, so only here the
        # input size is read beforehand, from a session that builds no kernels.
        s = read_onnx_info(self.path).input_size
        cache = self.path.with_name(self.path.name + ".trt-cache")
        cache.mkdir(exist_ok=True)
        trt_options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_profile_min_shapes": f"images:1x3x{s}x{s}",
            "trt_profile_opt_shapes": f"images:32x3x{s}x{s}",
            "trt_profile_max_shapes": f"images:256x3x{s}x{s}",
        }
        return [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime on the loader's provider; the metadata is read from the session that runs."""

    backend = "onnxruntime"

    def __init__(self, loader: SessionFromOnnx) -> None:
        self.loader = loader
        self.provider = loader.provider
        self.threads = loader.threads
        self._session: Any = None
        super().__init__(None, str(loader.path))

    def _activate(self) -> None:
        session = self.loader()
        self.info = _info_from_session(session, self.source)
        self._session = session

    def _deactivate(self) -> None:
        self._session = None

    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        names = ["codes", "u"] if with_u else ["codes"]
        out = self._session.run(names, {"images": images})
        return out[0], (out[1] if with_u else None)

    def _describe(self) -> dict[str, Any]:
        ort = _ort()
        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": self._session.get_providers() if self._session is not None else None,
            "device": ort.get_device(),
            "precision": "fp32" if self.provider != "tensorrt" else "fp32 (tensorrt provider)",
            "threads": self.threads,
        }


def _runner(provider: str, path: Path, threads: int | None = None, bits: int | None = None) -> OrtRunner:
    return OrtRunner(SessionFromOnnx(path, provider, threads))


for _provider in PROVIDERS:  # fastest first
    register(Backend(
        f"ort-{_provider}", "onnx", partial(_runner, _provider), partial(provider_unavailable_reason, _provider),
        device="cpu" if _provider == "cpu" else "cuda",
    ))  # fmt: skip
