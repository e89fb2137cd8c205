"""TrtRunner: a serialized TensorRT 10 engine (`dsah-rt export --trt`), run with execute_async_v3.

An engine is compiled for one GPU model and one TensorRT version and does not load, or loads
and misbehaves, elsewhere. `model.engine.json` beside it records both; loading refuses any
mismatch before TensorRT is asked to deserialize.

TensorRT and cuda-python are optional (`pip install 'dsah-rt[tensorrt]'`); nothing here imports
them until a runner is activated or an engine is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dsah_rt.runners.base import ModelError, ModelInfo, Runner

ENGINE_FORMAT = "dsah-rt-engine/1"
TRT_MAJOR = 10


def tensorrt_module() -> Any:
    """The tensorrt package, or a ModelError that says why it cannot be used."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelError(
            f"TensorRT {TRT_MAJOR} is not installed ({exc}); "
            "pip install 'dsah-rt[tensorrt]' on a machine with an NVIDIA GPU"
        ) from None
    if int(tensorrt.__version__.split(".")[0]) != TRT_MAJOR:
        raise ModelError(f"TensorRT {tensorrt.__version__} found; dsah-rt targets the TensorRT {TRT_MAJOR} API")
    return tensorrt


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA device can be used here, else the reason (for skips and --backend auto)."""
    try:
        tensorrt_module()
        current_gpu()
    except ModelError as exc:
        return str(exc)
    return None


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python before 12.6 kept the module at the top level
            from cuda import cudart
        except ImportError as exc:
            hint = "pip install 'dsah-rt[tensorrt]'"
            raise ModelError(f"the TensorRT runner needs cuda-python ({exc}); {hint}") from None
    return cudart


def _cuda(result: Any) -> Any:
    """Unwrap cuda-python's (error, value...) tuples; a CUDA error becomes an exception."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorString(err)[1]
        raise ModelError(f"CUDA error {err}: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


def current_gpu() -> dict[str, str]:
    """Name and compute capability of the current CUDA device."""
    cudart = _cudart()
    device = _cuda(cudart.cudaGetDevice())
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: str | os.PathLike[str]) -> dict[str, Any]:
    engine = Path(engine)
    side = sidecar_path(engine)
    if not engine.is_file():
        raise ModelError(f"{engine}: no such engine file")
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        hint = "build one with 'dsah-rt export --trt'"
        raise ModelError(f"{engine}: no {side.name} beside it; not a dsah-rt engine ({hint})") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{side}: unreadable engine metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelError(f"{side}: not dsah-rt engine metadata (format {found!r})")
    return meta


def check_engine_compatible(meta: dict[str, Any], where: str, trt_version: str, gpu: dict[str, str]) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU, naming both."""
    problems = []
    if meta.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {meta.get('tensorrt_version')} (this machine has {trt_version})")
    for key, label in (("compute_capability", "compute capability"), ("gpu_name", "GPU")):
        if meta.get(key) != gpu[key]:
            problems.append(f"{label} {meta.get(key)} (this machine has {gpu[key]})")
    if problems:
        raise ModelError(
            f"{where}: engine was built for {'; '.join(problems)}. Engines are specific to one GPU model and "
            "TensorRT version: rebuild it here with 'dsah-rt export RUN_DIR --trt' or use model.onnx"
        )


class TrtRunner(Runner):
    """A dsah-rt engine on the current GPU: host uint8 batch -> device -> execute_async_v3 -> host codes."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta = read_sidecar(self.path)
        info = ModelInfo.from_metadata(self.meta.get("model", {}), str(sidecar_path(self.path)))
        self._context: Any = None
        self._buffers: dict[str, int] = {}
        super().__init__(info, str(self.path))

    @property
    def max_batch(self) -> int:
        return int(self.meta["batch"]["max"])

    def _activate(self) -> None:
        trt = tensorrt_module()
        cudart = _cudart()
        check_engine_compatible(self.meta, str(self.path), trt.__version__, current_gpu())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ModelError(f"{self.path}: TensorRT could not deserialize the engine (see its log above)")
        self._context = self._engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate())
        s, n = self.info.input_size, self.max_batch
        sizes = {"images": n * 3 * s * s, "codes": n * self.info.nbytes}
        if self.info.with_u:
            sizes["u"] = n * self.info.bits * 4
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if names != set(sizes):
            raise ModelError(f"{self.path}: engine tensors {sorted(names)} do not match its metadata {sorted(sizes)}")
        for name, size in sizes.items():
            self._buffers[name] = _cuda(cudart.cudaMalloc(size))
            self._context.set_tensor_address(name, self._buffers[name])

    def _deactivate(self) -> None:
        cudart = _cudart()
        for ptr in self._buffers.values():
            _cuda(cudart.cudaFree(ptr))
        self._buffers.clear()
        _cuda(cudart.cudaStreamDestroy(self._stream))
        self._context = self._engine = self._runtime = None

    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        cudart = _cudart()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        n = len(images)
        if not self._context.set_input_shape("images", images.shape):
            raise ModelError(f"{self.path}: batch {n} is outside the engine's profile 1..{self.max_batch}")
        _cuda(cudart.cudaMemcpyAsync(self._buffers["images"], images.ctypes.data, images.nbytes, h2d, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise ModelError(f"{self.path}: TensorRT execution failed (see its log above)")
        codes = np.empty((n, self.info.nbytes), np.uint8)
        _cuda(cudart.cudaMemcpyAsync(codes.ctypes.data, self._buffers["codes"], codes.nbytes, d2h, self._stream))
        u = None
        if with_u:
            u = np.empty((n, self.info.bits), np.float32)
            _cuda(cudart.cudaMemcpyAsync(u.ctypes.data, self._buffers["u"], u.nbytes, d2h, self._stream))
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return codes, u

    def _describe(self) -> dict[str, Any]:
        return {
            "runtime": f"tensorrt {self.meta.get('tensorrt_version')}",
            "device": f"{self.meta.get('gpu_name')} (sm {self.meta.get('compute_capability')})",
            "precision": self.meta.get("precision"),
            "batch": self.meta.get("batch"),
        }
