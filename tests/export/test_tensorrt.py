"""TensorRT engines: build, precision, sidecar, refusal of foreign engines.

Building and running need TensorRT 10 and an NVIDIA GPU; those tests skip with the reason where
either is missing. The checks of the sidecar and of the refusal logic run everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from dsah_fixtures import BITS, INPUT_SIZE

from dsah_rt.runners import ModelError, make_runner, model_kind
from dsah_rt.runners.trt import ENGINE_FORMAT, check_engine_compatible, read_sidecar, tensorrt_unavailable_reason

TRT_REASON = tensorrt_unavailable_reason()
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT unavailable: {TRT_REASON}")


def _meta(**changes) -> dict:
    meta = {"format": ENGINE_FORMAT, "tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    return {**meta, **changes}


def test_an_engine_from_another_gpu_or_tensorrt_version_is_refused():
    here = {"gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    check_engine_compatible(_meta(), "m.engine", "10.3.0", here)
    with pytest.raises(ModelError, match=r"built for TensorRT 10.0.1 \(this machine has 10.3.0\)"):
        check_engine_compatible(_meta(tensorrt_version="10.0.1"), "m.engine", "10.3.0", here)
    with pytest.raises(ModelError, match=r"compute capability 8.6 \(this machine has 9.0\); GPU NVIDIA A10") as info:
        check_engine_compatible(_meta(gpu_name="NVIDIA A10", compute_capability="8.6"), "m.engine", "10.3.0", here)
    assert "rebuild it here" in str(info.value)


def test_an_engine_without_its_sidecar_is_not_a_dsah_rt_engine(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)
    assert model_kind(engine) == "engine"
    with pytest.raises(ModelError, match="not a dsah-rt engine"):
        make_runner(engine, "trt")
    (tmp_path / "model.engine.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ModelError, match="not dsah-rt engine metadata"):
        read_sidecar(engine)


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here")
def test_without_tensorrt_an_engine_fails_with_the_reason(model, tmp_path):
    from dsah_rt.runners.ort import read_onnx_info

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)
    sidecar = {**_meta(), "batch": {"min": 1, "opt": 8, "max": 8}, "model": read_onnx_info(model[1]).to_metadata()}
    (tmp_path / "model.engine.json").write_text(json.dumps(sidecar))
    with pytest.raises(ModelError, match="TensorRT 10 is not installed|CUDA"):
        make_runner(engine, "trt")


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_build_verifies_against_pytorch(model, tmp_path, precision):
    from dsah_rt.export.tensorrt_build import build_engine
    from dsah_rt.export.verify import verify_model

    run, onnx_path = model
    engine, cache = tmp_path / "model.engine", tmp_path / "timing.cache"
    meta = build_engine(onnx_path, engine, precision, max_batch=32, timing_cache=cache)
    assert cache.stat().st_size > 0
    side = read_sidecar(engine)
    assert side == meta and side["bits"] == BITS and side["input_size"] == INPUT_SIZE
    assert {"tensorrt_version", "gpu_name", "compute_capability"} <= side.keys()
    assert (side["fp32_layers"] > 0) == (precision != "fp32")
    with make_runner(run, "torch") as reference:
        report = verify_model(engine, reference, "trt")
    assert report["ok"], report["problems"]


@needs_trt
def test_engine_runner_splits_batches_over_its_profile_and_refuses_a_foreign_sidecar(model, tmp_path):
    from dsah_rt.export.tensorrt_build import build_engine

    engine = tmp_path / "model.engine"
    build_engine(model[1], engine, "fp32", max_batch=4)
    images = np.random.default_rng(0).integers(0, 256, (11, 3, INPUT_SIZE, INPUT_SIZE), np.uint8)
    with make_runner(engine, "trt") as trt, make_runner(model[1], "ort-cpu") as ort:
        assert trt.max_batch == 4
        codes = trt.infer(images)  # 4 + 4 + 3
        assert codes.shape == (11, 2)
        assert np.unpackbits(codes ^ ort.infer(images)).mean() <= 0.01
    side = read_sidecar(engine)
    (tmp_path / "model.engine.json").write_text(json.dumps({**side, "tensorrt_version": "10.0.0-other"}))
    with pytest.raises(ModelError, match="engine was built for TensorRT 10.0.0-other"):
        make_runner(engine, "trt")
