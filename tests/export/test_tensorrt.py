"""TensorRT engines: build, precision, sidecar, refusal of foreign engines, engines built by trtexec.

Building and running need TensorRT 10 and an NVIDIA GPU; those tests skip with the reason where
either is missing. The checks of the sidecar, of an engine's I/O against the model's metadata and
the refusal logic run everywhere, on a stand-in for the tensorrt module and its engine.
"""

from __future__ import annotations

import enum
import json
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from dsah_fixtures import BITS, INPUT_SIZE

from dsah_rt.cli import main
from dsah_rt.runners import ModelError, make_runner, model_kind
from dsah_rt.runners import trt as trt_runner
from dsah_rt.runners.ort import read_onnx_info
from dsah_rt.runners.trt import (
    ENGINE_FORMAT,
    EngineFromFile,
    EngineWarning,
    check_engine_compatible,
    check_engine_io,
    read_sidecar,
    tensorrt_unavailable_reason,
)

TRT_REASON = tensorrt_unavailable_reason()
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT unavailable: {TRT_REASON}")
HERE = {"gpu_name": "NVIDIA H100", "compute_capability": "9.0"}


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeEngine:
    """The ICudaEngine calls check_engine_io makes (num_io_tensors, get_tensor_*), over a dict."""

    def __init__(self, tensors: dict[str, tuple[TensorIOMode, type, tuple[int, ...]]], max_batch: int = 8) -> None:
        self.tensors, self.max_batch = tensors, max_batch
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> type:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        assert profile == 0 and self.tensors[name][0] is TensorIOMode.INPUT
        shape = self.tensors[name][2][1:]
        return (1, *shape), (1, *shape), (self.max_batch, *shape)


class FakeLogger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


def fake_tensorrt(engine: FakeEngine, version: str = "10.3.0") -> SimpleNamespace:
    """A stand-in for the tensorrt module: its dtypes are numpy types, so nptype is the identity."""
    return SimpleNamespace(
        __version__=version, TensorIOMode=TensorIOMode, nptype=lambda dtype: dtype, Logger=FakeLogger,
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
    )  # fmt: skip


def io_of(info, **changes) -> dict:
    """The engine tensors that a correct build of `info`'s model has, with `changes` applied."""
    s = info.input_size
    tensors = {
        "images": (TensorIOMode.INPUT, np.uint8, (-1, 3, s, s)),
        "codes": (TensorIOMode.OUTPUT, np.uint8, (-1, info.nbytes)),
        "u": (TensorIOMode.OUTPUT, np.float32, (-1, info.bits)),
    }
    tensors.update(changes)
    return {name: value for name, value in tensors.items() if value is not None}


def _meta(**changes) -> dict:
    return {"format": ENGINE_FORMAT, "tensorrt_version": "10.3.0", **HERE, **changes}


def test_an_engine_from_another_gpu_or_tensorrt_version_is_refused():
    check_engine_compatible(_meta(), "m.engine", "10.3.0", HERE)
    with pytest.raises(ModelError, match=r"built for TensorRT 10.0.1 \(this machine has 10.3.0\)"):
        check_engine_compatible(_meta(tensorrt_version="10.0.1"), "m.engine", "10.3.0", HERE)
    with pytest.raises(ModelError, match=r"compute capability 8.6 \(this machine has 9.0\); GPU NVIDIA A10") as info:
        check_engine_compatible(_meta(gpu_name="NVIDIA A10", compute_capability="8.6"), "m.engine", "10.3.0", HERE)
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


def test_engine_io_is_checked_against_the_models_metadata(model):
    info = read_onnx_info(model[1])
    trt = fake_tensorrt(FakeEngine({}))
    assert check_engine_io(trt, FakeEngine(io_of(info), max_batch=8), info, "m.engine") == 8
    fixed = io_of(info, images=(TensorIOMode.INPUT, np.uint8, (4, 3, INPUT_SIZE, INPUT_SIZE)))
    assert check_engine_io(trt, FakeEngine(fixed, max_batch=99), info, "m.engine") == 4  # a fixed batch is the bound
    out, inp = TensorIOMode.OUTPUT, TensorIOMode.INPUT
    wrong = {
        "codes is output int8 [-1, 2], expected output uint8 [batch, 2]": {"codes": (out, np.int8, (-1, 2))},
        "images is input uint8 [-1, 3, 64, 64], expected input uint8 [batch, 3, 32, 32]": {
            "images": (inp, np.uint8, (-1, 3, 64, 64))},
        f"u is output float16 [-1, {BITS}]": {"u": (out, np.float16, (-1, BITS))},
        "u is input float32": {"u": (inp, np.float32, (-1, BITS))},
        "tensors ['codes', 'images'], expected ['codes', 'images', 'u']": {"u": None},
    }  # fmt: skip
    for message, changes in wrong.items():
        with pytest.raises(ModelError, match="engine does not match the model's metadata") as err:
            check_engine_io(trt, FakeEngine(io_of(info, **changes)), info, "m.engine")
        assert message in str(err.value)


def _engine_beside_onnx(model, tmp_path):
    """An engine file as trtexec writes it (no sidecar), with the model.onnx it was built from beside it."""
    shutil.copy(model[1], tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"serialized by trtexec")
    return engine, read_onnx_info(model[1])


def test_an_engine_without_sidecar_is_accepted_on_its_io_with_a_warning(model, tmp_path, monkeypatch):
    engine, info = _engine_beside_onnx(model, tmp_path)
    monkeypatch.setattr(trt_runner, "current_gpu", lambda: HERE)
    monkeypatch.setattr(trt_runner, "tensorrt_module", lambda: fake_tensorrt(FakeEngine(io_of(info), max_batch=16)))
    with pytest.warns(EngineWarning, match="no model.engine.json.*match model.onnx") as caught:
        loaded = EngineFromFile(engine)()
    assert len(caught) == 1 and "dsah-rt verify model.engine --run RUN_DIR" in str(caught[0].message)
    assert loaded.info == info and loaded.sidecar is None and loaded.max_batch == 16
    assert loaded.gpu == HERE and loaded.tensorrt_version == "10.3.0"

    bad = FakeEngine(io_of(info, codes=(TensorIOMode.OUTPUT, np.uint8, (-1, 3))))
    monkeypatch.setattr(trt_runner, "tensorrt_module", lambda: fake_tensorrt(bad))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineWarning)  # refused before any warning
        with pytest.raises(ModelError, match=r"codes is output uint8 \[-1, 3\]"):
            EngineFromFile(engine)()


def test_a_sidecar_engine_is_checked_for_this_machine_before_it_is_deserialized(model, tmp_path, monkeypatch):
    engine, info = _engine_beside_onnx(model, tmp_path)
    foreign = {**_meta(tensorrt_version="10.0.1"), "model": info.to_metadata()}
    (tmp_path / "model.engine.json").write_text(json.dumps(foreign))
    fake = fake_tensorrt(FakeEngine(io_of(info)))
    fake.Runtime = lambda log: pytest.fail("deserialized an engine built for another TensorRT")
    monkeypatch.setattr(trt_runner, "current_gpu", lambda: HERE)
    monkeypatch.setattr(trt_runner, "tensorrt_module", lambda: fake)
    with pytest.raises(ModelError, match=r"built for TensorRT 10.0.1 \(this machine has 10.3.0\)"):
        EngineFromFile(engine)()
    (tmp_path / "model.engine.json").write_text(json.dumps({**_meta(), "model": info.to_metadata()}))
    fake.Runtime = lambda log: SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(io_of(info), 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineWarning)  # a sidecar engine is accepted silently
        loaded = EngineFromFile(engine)()
    assert loaded.sidecar["tensorrt_version"] == "10.3.0" and loaded.max_batch == 4 and loaded.info == info


def _without_u(onnx_path, out):
    """The same model exported without u: the output and the metadata flag removed."""
    proto = onnx.load(onnx_path)
    for i, output in enumerate(proto.graph.output):
        if output.name == "u":
            del proto.graph.output[i]
    for prop in proto.metadata_props:
        if prop.key == "dsah_rt.with_u":
            prop.value = "false"
    onnx.save(proto, out)
    return out


def test_export_from_model_onnx_alone_checks_its_options_and_needs_u(model, tmp_path):
    run, onnx_path = model
    cli = CliRunner()
    engine = str(tmp_path / "m.engine")
    for args, message in (
        (["--trt", engine, "--out", "x.onnx", "--with-u"], "--out, --with-u apply only to a RUN_DIR"),
        ([], "pass --trt ENGINE to build its TensorRT engine"),
    ):
        result = cli.invoke(main, ["export", str(onnx_path), *args])
        assert result.exit_code == 1 and message in result.output, result.output
    no_u = _without_u(onnx_path, tmp_path / "no-u.onnx")
    result = cli.invoke(main, ["export", str(no_u), "--trt", engine])
    assert result.exit_code == 1 and "has no output u" in result.output and "--with-u" in result.output
    result = cli.invoke(main, ["export", str(run), "--trt", engine])
    assert result.exit_code == 1 and "--out (the ONNX file to write) is needed" in result.output
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here")
def test_export_from_model_onnx_alone_fails_with_the_reason_without_tensorrt(model, tmp_path):
    result = CliRunner().invoke(main, ["export", str(model[1]), "--trt", str(tmp_path / "m.engine")])
    assert result.exit_code == 1 and "TensorRT 10 is not installed" in result.output


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here")
def test_without_tensorrt_an_engine_fails_with_the_reason(model, tmp_path):
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


@needs_trt
def test_an_engine_built_from_model_onnx_alone_is_verified_against_onnxruntime(model, tmp_path):
    from dsah_rt.export.pipeline import export_engine

    engine = tmp_path / "model.engine"
    report = export_engine(model[1], engine, "fp16", max_batch=16)
    assert report["ok"], report["problems"]
    assert report["reference"]["backend"] == "onnxruntime" and report["sidecar"]["precision"] == "fp16"


@needs_trt
def test_an_engine_without_its_sidecar_runs_with_a_warning(model, tmp_path):
    """What trtexec leaves: an engine and no sidecar. The ONNX beside it supplies the metadata."""
    from dsah_rt.export.tensorrt_build import build_engine

    engine = tmp_path / "model.engine"
    shutil.copy(model[1], tmp_path / "model.onnx")
    build_engine(tmp_path / "model.onnx", engine, "fp32", max_batch=8)
    (tmp_path / "model.engine.json").unlink()
    images = np.random.default_rng(1).integers(0, 256, (9, 3, INPUT_SIZE, INPUT_SIZE), np.uint8)
    with pytest.warns(EngineWarning, match="no model.engine.json"):
        trt = make_runner(engine, "trt")
    with trt, make_runner(model[1], "ort-cpu") as ort:
        assert trt.max_batch == 8 and trt.describe()["sidecar"] is False
        assert np.unpackbits(trt.infer(images) ^ ort.infer(images)).mean() <= 0.01
