"""TrtRunner: a serialized TensorRT 10 engine, run with execute_async_v3.

An engine is compiled for one GPU model and one TensorRT version and does not load, or loads
and misbehaves, elsewhere. `dsah-rt export --trt` writes `model.engine.json` beside it, recording
both and the model's metadata; loading refuses any mismatch before TensorRT is asked to
deserialize. An engine built otherwise (trtexec) has no sidecar: it is accepted, with an
EngineWarning, when the model.onnx it was built from lies beside it and the engine's inputs and
outputs match that file's metadata.

TensorRT and cuda-python are optional (`pip install 'dsah-rt[tensorrt]'`); nothing here imports
them until a runner is activated or an engine is built. Registers the backend `trt`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsah_rt.runners.base import ModelError, ModelInfo, Runner
from dsah_rt.runners.ort import read_onnx_info
from dsah_rt.runners.registry import Backend, register

if TYPE_CHECKING:
    import numpy as np

ENGINE_FORMAT = "dsah-rt-engine/1"
TRT_MAJOR = 10
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class EngineWarning(UserWarning):
    """An engine accepted without the checks its sidecar would allow (GPU, TensorRT version, precision)."""


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
    side, onnx = sidecar_path(engine), engine.with_suffix(".onnx").name
    if not engine.is_file():
        raise ModelError(f"{engine}: no such engine file")
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        hint = f"build one with 'dsah-rt export --trt', or put the ONNX it was built from beside it as {onnx}"
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
            "TensorRT version: rebuild it here with 'dsah-rt export model.onnx --trt model.engine' or use model.onnx"
        )


def engine_metadata(engine: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, ModelInfo]:
    """(sidecar, model metadata) from model.engine.json; (None, metadata of the model.onnx beside it) without one."""
    engine = Path(engine)
    onnx = engine.with_suffix(".onnx")
    if engine.is_file() and not sidecar_path(engine).exists() and onnx.is_file():
        return None, read_onnx_info(onnx)
    meta = read_sidecar(engine)
    return meta, ModelInfo.from_metadata(meta.get("model", {}), str(sidecar_path(engine)))


def check_engine_io(trt: Any, engine: Any, info: ModelInfo, where: str) -> int:
    """Refuse an engine whose I/O tensors are not the ones `info` promises; return its largest batch.

    The batch dimension may be dynamic (-1, bounded by optimisation profile 0) or fixed.
    """
    import numpy as np

    s = info.input_size
    expected = {
        "images": (trt.TensorIOMode.INPUT, np.dtype(np.uint8), (3, s, s)),
        "codes": (trt.TensorIOMode.OUTPUT, np.dtype(np.uint8), (info.nbytes,)),
    }
    if info.with_u:
        expected["u"] = (trt.TensorIOMode.OUTPUT, np.dtype(np.float32), (info.bits,))
    found = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        found[name] = (engine.get_tensor_mode(name), dtype, tuple(engine.get_tensor_shape(name)))
    problems = [f"tensors {sorted(found)}, expected {sorted(expected)}"] if set(found) != set(expected) else []
    for name in sorted(set(found) & set(expected)):
        (mode, dtype, shape), (want_mode, want_dtype, tail) = found[name], expected[name]
        if mode != want_mode or dtype != want_dtype or len(shape) != 1 + len(tail) or shape[1:] != tail:
            problems.append(f"{name} is {mode.name.lower()} {dtype} {list(shape)}, expected "
                            f"{want_mode.name.lower()} {want_dtype} [batch, {', '.join(map(str, tail))}]")  # fmt: skip
    if problems:
        raise ModelError(f"{where}: engine does not match the model's metadata: {'; '.join(problems)}")
    batch = found["images"][2][0]
    return int(batch if batch > 0 else engine.get_tensor_profile_shape("images", 0)[2][0])


@dataclass
class LoadedEngine:
    """What EngineFromFile loaded: the engine, the metadata it was checked against, where it runs."""

    engine: Any
    info: ModelInfo
    sidecar: dict[str, Any] | None
    max_batch: int
    tensorrt_version: str
    gpu: dict[str, str]
    owners: tuple[Any, ...]  # the logger and runtime, which must outlive the engine


class EngineFromFile:
    """A lazy loader, in Polygraphy's style: calling it checks, deserializes and checks again."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self) -> LoadedEngine:
        where = str(self.path)
        sidecar, info = engine_metadata(self.path)  # before TensorRT: a wrong file fails without it
        trt = tensorrt_module()
        gpu = current_gpu()
        if sidecar is not None:
            check_engine_compatible(sidecar, where, trt.__version__, gpu)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ModelError(f"{where}: TensorRT could not deserialize the engine (see its log above)")
        max_batch = check_engine_io(trt, engine, info, where)
        if sidecar is None:
            warnings.warn(
                f"{where}: no {sidecar_path(self.path).name}, so its GPU, TensorRT version and precision are "
                f"unrecorded; accepted because its inputs and outputs match {self.path.with_suffix('.onnx').name}. "
                f"Check its codes with 'dsah-rt verify {self.path.name} --run RUN_DIR'",
                EngineWarning,
                stacklevel=2,
            )
        return LoadedEngine(engine, info, sidecar, max_batch, trt.__version__, gpu, (logger, runtime))


class TrtRunner(Runner):
    """An engine on the current GPU: host uint8 batch -> device -> execute_async_v3 -> host codes."""

    backend = "tensorrt"

    def __init__(self, loader: EngineFromFile) -> None:
        self.loader = loader
        self.path = loader.path
        self._loaded: LoadedEngine | None = None
        self._context: Any = None
        self._buffers: dict[str, int] = {}
        super().__init__(None, str(self.path))

    @property
    def max_batch(self) -> int:
        if self._loaded is None:
            raise RuntimeError("TrtRunner is not active: its batch range is read from the engine on activate()")
        return self._loaded.max_batch

    def _activate(self) -> None:
        loaded = self.loader()
        cudart = _cudart()
        self._context = loaded.engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate())
        s, n = loaded.info.input_size, loaded.max_batch
        sizes = {"images": n * 3 * s * s, "codes": n * loaded.info.nbytes}
        if loaded.info.with_u:
            sizes["u"] = n * loaded.info.bits * 4
        for name, size in sizes.items():
            self._buffers[name] = _cuda(cudart.cudaMalloc(size))
            self._context.set_tensor_address(name, self._buffers[name])
        self._loaded, self.info = loaded, loaded.info

    def _deactivate(self) -> None:
        cudart = _cudart()
        for ptr in self._buffers.values():
            _cuda(cudart.cudaFree(ptr))
        self._buffers.clear()
        _cuda(cudart.cudaStreamDestroy(self._stream))
        self._context = self._loaded = None

    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import numpy as np

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
        loaded = self._loaded
        if loaded is None:  # deactivated: the engine is released
            return {"runtime": "tensorrt", "precision": None}
        side = loaded.sidecar or {}
        return {
            "runtime": f"tensorrt {loaded.tensorrt_version}",
            "device": f"{loaded.gpu['gpu_name']} (sm {loaded.gpu['compute_capability']})",
            "precision": side.get("precision", "unknown (no sidecar)"),
            "batch": side.get("batch", {"max": loaded.max_batch}),
            "sidecar": loaded.sidecar is not None,
        }


def _runner(path: Path, threads: int | None = None, bits: int | None = None) -> TrtRunner:
    return TrtRunner(EngineFromFile(path))


register(Backend("trt", "engine", _runner, tensorrt_unavailable_reason, device="cuda"))
