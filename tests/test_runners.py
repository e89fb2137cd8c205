"""Runners: one interface test for every backend, the registry, lazy loaders, provider and model-file checks,
no torch at runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from dsah_fixtures import BITS, INPUT_SIZE

from dsah_rt.codes import binarize, nbytes_for, pack
from dsah_rt.runners import ModelError, Runner, backend_names, make_runner, model_kind, registry
from dsah_rt.runners.ort import OrtRunner, SessionFromOnnx, read_onnx_info
from dsah_rt.runners.trt import tensorrt_unavailable_reason

TRT_REASON = tensorrt_unavailable_reason()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)


def _runner_for(backend: str, model, tmp_path) -> Runner:
    run, onnx_path = model
    if backend == "trt":
        if TRT_REASON:
            pytest.skip(f"TensorRT unavailable: {TRT_REASON}")
        from dsah_rt.export.tensorrt_build import build_engine

        build_engine(onnx_path, tmp_path / "model.engine", "fp32", max_batch=8)
        return make_runner(tmp_path / "model.engine", "trt")
    return make_runner(run if backend == "torch" else onnx_path, backend)


@pytest.mark.parametrize("backend", ["ort-cpu", "torch", "trt"])
def test_every_runner_satisfies_the_interface(backend, model, tmp_path):
    runner = _runner_for(backend, model, tmp_path)
    assert runner.is_active  # make_runner activates
    with runner:
        images = _images(11)
        codes = runner.infer(images)
        assert codes.dtype == np.uint8 and codes.shape == (11, nbytes_for(BITS))
        # Batch independence: one call of 11 equals 11 calls of 1.
        np.testing.assert_array_equal(codes, np.concatenate([runner.infer(images[i : i + 1]) for i in range(11)]))
        codes_u, u = runner.infer_with_u(images)
        assert u.shape == (11, BITS) and u.dtype == np.float32
        np.testing.assert_array_equal(codes_u, codes)
        np.testing.assert_array_equal(codes, pack(binarize(u)))  # the graph packs MSB first, pad bits zero
        info = runner.describe()
        assert {"backend", "model", "bits", "input_size", "fingerprint", "precision", "runtime"} <= info.keys()
        assert info["bits"] == BITS and info["input_size"] == INPUT_SIZE
        for bad in (images.astype(np.float32), images[:, :, :16], images[0], images[:0]):
            with pytest.raises(ModelError):
                runner.infer(bad)
    assert not runner.is_active
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(images)


def test_onnxruntime_matches_the_pytorch_reference(model):
    from dsah_rt.export.verify import scene_images

    run, onnx_path = model
    with make_runner(onnx_path, "ort-cpu") as ort, make_runner(run, "torch") as ref:
        for images in (_images(17, seed=3), scene_images(17, INPUT_SIZE, seed=3)):
            ref_codes, ref_u = ref.infer_with_u(images)
            codes = ort.infer(images)
            flips = np.unpackbits(codes ^ ref_codes, axis=1)[:, :BITS].astype(bool)
            # Any flip must sit on a reference u that is numerically zero.
            assert np.all(np.abs(ref_u[flips]) < 1e-5 * np.abs(ref_u).max())
            assert flips.mean() <= 1e-3


def test_auto_picks_an_available_backend_and_says_which(model):
    run, onnx_path = model
    with make_runner(onnx_path) as runner:
        assert runner.backend == "onnxruntime"
        assert "auto chose ort-cpu" in runner.describe()["selected"]
    with make_runner(run) as runner:
        assert runner.backend == "torch" and "auto chose torch" in runner.selection_note


def test_one_registration_reaches_make_runner_auto_and_the_cli(model, monkeypatch):
    """A backend registered first for ONNX files: auto tries it first (noting why it is unavailable),
    --backend accepts it by name, and make_runner builds it through its factory."""
    from click.testing import CliRunner

    from dsah_rt.cli import main

    built = []

    def factory(path, threads=None, bits=None):
        built.append(path)
        return OrtRunner(SessionFromOnnx(path, "cpu", threads))

    fake = registry.Backend("ort-fake", "onnx", factory, lambda: "no fake device here")
    monkeypatch.setattr(registry, "_REGISTRY", {"ort-fake": fake, **registry._REGISTRY})
    assert backend_names()[:2] == ("auto", "ort-fake")
    with make_runner(model[1]) as runner:
        assert "ort-fake: no fake device here" in runner.selection_note and not built
    with make_runner(model[1], "ort-fake") as runner:
        assert built == [model[1]] and runner.infer(_images(2)).shape == (2, nbytes_for(BITS))
    text = CliRunner().invoke(main, ["encode", "--help"]).output
    assert "ort-fake" in text
    bad = CliRunner().invoke(main, ["encode", "x", "--out", "c.npy", "--model", str(model[1]), "--backend", "gpu"])
    assert bad.exit_code == 2 and "'gpu' is not one of" in bad.output and "ort-fake" in bad.output


def test_the_registry_refuses_unknown_kinds_and_taken_names():
    with pytest.raises(ValueError, match="unknown model kind"):
        registry.register(registry.Backend("tf", "savedmodel", "nowhere:nothing", lambda: None))
    for taken in ("ort-cpu", "auto"):
        with pytest.raises(ValueError, match="is taken"):
            registry.register(registry.Backend(taken, "onnx", "nowhere:nothing", lambda: None))
    assert "tf" not in backend_names()


def test_a_runner_loads_nothing_until_activated_and_opens_one_session(model, monkeypatch):
    import onnxruntime

    expected = read_onnx_info(model[1])
    opened = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        opened.append(kwargs.get("providers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    runner = OrtRunner(SessionFromOnnx(model[1], "cpu"))
    assert opened == []
    with pytest.raises(RuntimeError, match="loaded no model yet"):
        runner.info
    with runner:
        assert runner.info == expected and opened == [["CPUExecutionProvider"]]


def test_the_torch_reference_reads_its_checkpoint_once(model, monkeypatch):
    import torch

    from dsah_rt.train.run_dir import run_fingerprint

    run = model[0]
    expected = run_fingerprint(run)  # an independent read of the checkpoint file
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    with make_runner(run, "torch") as ref:
        assert len(loads) == 1 and ref.info.fingerprint == expected
        assert ref.info == read_onnx_info(model[1])  # the export carries exactly what the reference reports


def test_a_gpu_provider_missing_from_the_build_is_refused(model):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(ModelError, match="has no CUDAExecutionProvider"):
        make_runner(model[1], "ort-cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_silent_cpu_fallback_is_refused(model, monkeypatch):
    """onnxruntime, given a provider it cannot start, logs a warning and runs on the CPU; refuse that."""
    import onnxruntime

    from dsah_rt.runners import ort

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: the fallback cannot be provoked")
    real = onnxruntime.get_available_providers()
    # Claim CUDA is available so the request reaches onnxruntime, which then really falls back.
    monkeypatch.setattr(ort._ort(), "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(ModelError, match="fell back to CPUExecutionProvider"):
        make_runner(model[1], "ort-cuda")


def test_wrong_backend_for_the_model_kind(model, tmp_path):
    run, onnx_path = model
    assert model_kind(run) == "run" and model_kind(onnx_path) == "onnx"
    with pytest.raises(ModelError, match="export it first"):
        make_runner(run, "ort-cpu")
    with pytest.raises(ModelError, match="needs a training RUN_DIR"):
        make_runner(onnx_path, "torch")
    with pytest.raises(ModelError, match="unknown backend 'gpu'; choose one of auto, "):
        make_runner(onnx_path, "gpu")
    with pytest.raises(ModelError, match="no such model"):
        make_runner(tmp_path / "missing.onnx")


def test_files_that_are_not_dsah_rt_models(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf at all" * 10)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        make_runner(garbage)
    graph = oh.make_graph(
        [oh.make_node("Identity", ["images"], ["codes"])], "plain",
        [oh.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["n", 3, 32, 32])],
        [oh.make_tensor_value_info("codes", onnx.TensorProto.UINT8, ["n", 3, 32, 32])],
    )  # fmt: skip
    plain = tmp_path / "plain.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), plain)
    with pytest.raises(ModelError, match="not a dsah-rt model"):
        make_runner(plain)


def test_metadata_that_disagrees_with_the_graph_is_refused(model, tmp_path):
    proto = onnx.load(model[1])
    for prop in proto.metadata_props:
        if prop.key == "dsah_rt.input_size":
            prop.value = "64"
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, edited)
    with pytest.raises(ModelError, match="does not match the metadata's input size 64"):
        make_runner(edited)


def test_the_runtime_needs_no_torch(model):
    """Running an exported model imports neither torch nor the training package."""
    code = f"""
import sys, numpy as np
from dsah_rt.runners import make_runner, registry
import dsah_rt.encode, dsah_rt.images, dsah_rt.cli_encode
with make_runner({str(model[1])!r}) as r:
    codes = r.infer(np.zeros((2, 3, {INPUT_SIZE}, {INPUT_SIZE}), np.uint8))
assert codes.shape == (2, {nbytes_for(BITS)})
reasons = {{b.name: b.unavailable() for b in registry.backends()}}  # the torch backend's included
assert reasons["torch"] is None, reasons
stages = ("dsah_rt.train", "dsah_rt.export")
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(stages))
assert not leaked, leaked
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
