"""model.onnx -> model.engine with the TensorRT 10 Python API, plus its sidecar model.engine.json.

* One optimisation profile over the batch: min 1, opt `opt_batch`, max `max_batch`.
* fp32 is strict fp32 (TF32 off). fp16 / bf16: the convolutional networks run in reduced
  precision; every layer named with the export's FP32_PREFIX (cast and scale, min-max, the
  saliency multiply, sign, packing) is pinned to fp32 under OBEY_PRECISION_CONSTRAINTS, so the
  min-max denominator and u >= 0 are never computed in half precision.
* A timing cache file is loaded when present and saved back after the build, so a rebuild
  (another precision, batch range) skips the kernel timing already done.
* The sidecar records the TensorRT version, GPU name and compute capability the engine is bound
  to, the batch range, precision and the model's dsah-rt metadata; TrtRunner refuses a mismatch.

TensorRT cannot be installed everywhere (it needs an NVIDIA driver); `tensorrt_unavailable_reason()`
says why it is not usable here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsah_rt.atomic import atomic_write, write_json
from dsah_rt.errors import UserError
from dsah_rt.export.onnx_export import FP32_PREFIX
from dsah_rt.runners.ort import read_onnx_info
from dsah_rt.runners.trt import ENGINE_FORMAT, current_gpu, sidecar_path, tensorrt_module

PRECISIONS = ("fp32", "fp16", "bf16")
WORKSPACE_BYTES = 4 << 30


class EngineBuildError(UserError):
    """TensorRT could not parse or build the model."""


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> Any:
    # TensorRT 10 networks are always explicit-batch; 0 asks for no other creation flag.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    return network


def pin_fp32_layers(trt: Any, network: Any) -> int:
    """Constrain the export's FP32_PREFIX layers (and their float outputs) to fp32; return how many."""
    floats = {trt.float32, trt.float16, trt.bfloat16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith(FP32_PREFIX):
            continue
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outputs:
            continue  # shape arithmetic, comparisons, casts to integers: not float math
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    precision: str = "fp16",
    max_batch: int = 256,
    opt_batch: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> dict[str, Any]:
    """Build and write `engine_path` and its sidecar; return the sidecar's contents."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    opt_batch = min(opt_batch or 32, max_batch)
    trt = tensorrt_module()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = read_onnx_info(onnx_path)
    gpu = current_gpu()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse_onnx(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    pinned = 0
    if precision == "fp32":
        # TF32 is on by default for fp32 builds on Ampere and later: 10-bit mantissas in every
        # convolution. fp32 here means fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_fp32_layers(trt, network)
        if not pinned:
            raise EngineBuildError(f"{onnx_path}: no {FP32_PREFIX} layers found to keep in fp32; re-export the model")

    s = info.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, s, s), (opt_batch, 3, s, s), (max_batch, 3, s, s))
    config.add_optimization_profile(profile)

    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    atomic_write(engine_path, lambda fh: fh.write(memoryview(serialized)))
    if cache_file is not None:
        atomic_write(cache_file, lambda fh: fh.write(memoryview(config.get_timing_cache().serialize())))
    meta = {
        "format": ENGINE_FORMAT,
        "tensorrt_version": trt.__version__,
        **gpu,
        "precision": precision,
        "fp32_layers": pinned,
        "batch": {"min": 1, "opt": opt_batch, "max": max_batch},
        "bits": info.bits,
        "input_size": info.input_size,
        "onnx": onnx_path.name,
        "model": info.to_metadata(),
    }
    write_json(sidecar_path(engine_path), meta)
    return meta
