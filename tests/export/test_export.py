"""ONNX export: one verified file, its metadata, bits against PyTorch, and loud failures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from dsah_fixtures import BITS, INPUT_SIZE, make_run

from dsah_rt import __version__
from dsah_rt.cli import main
from dsah_rt.codes import binarize, pack
from dsah_rt.export.onnx_export import FP32_PREFIX
from dsah_rt.export.pipeline import export_run
from dsah_rt.export.verify import TOLERANCES, VerifyError, check_onnx_graph, scene_images, verify_model
from dsah_rt.runners import make_runner
from dsah_rt.runners.base import ModelInfo
from dsah_rt.train.run_dir import load_run, run_fingerprint


@pytest.fixture(scope="module")
def reference(model):
    with make_runner(model[0], "torch") as runner:
        yield runner


def test_one_file_with_a_dynamic_uint8_batch_and_metadata(model):
    run, path = model
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["model.onnx"]  # no external data
    proto = onnx.load(path)
    (inp,) = proto.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, INPUT_SIZE, INPUT_SIZE]
    assert [o.name for o in proto.graph.output] == ["codes", "u"]
    meta = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_metadata(meta, str(path))
    _, config = load_run(run)
    assert (info.bits, info.input_size, info.backbone, info.method) == (BITS, INPUT_SIZE, "small", "dsah")
    assert list(info.mean) == config["mean"] and list(info.std) == config["std"]
    assert info.bit_order == "msb" and info.version == __version__
    assert info.fingerprint == run_fingerprint(run)


@pytest.mark.parametrize("fcn", ["16s", "8s"])
def test_either_fcn_exports_to_one_verified_graph(fcn, tmp_path):
    run = make_run(tmp_path / "run", fcn=fcn)
    report = export_run(run, tmp_path / "model.onnx", with_u=True)
    ups = [n for n in onnx.load(tmp_path / "model.onnx").graph.node if n.op_type == "ConvTranspose"]
    assert len(ups) == {"16s": 2, "8s": 3}[fcn]  # stride 32 -> 16 -> 1, or 32 -> 16 -> 8 -> 1
    net, _ = load_run(run)
    skips = [net.attention.score_c4] + ([net.attention.score_c3] if fcn == "8s" else [])
    assert net.attention.fcn == fcn and all(layer.weight.abs().sum() > 0 for layer in skips)
    images = scene_images(9, INPUT_SIZE, seed=2)
    with torch.no_grad():
        u = net.encode(torch.from_numpy(images).float() / 255).numpy()
    with make_runner(tmp_path / "model.onnx", "ort-cpu") as ort:
        _, u_ort = ort.infer_with_u(images)
    np.testing.assert_allclose(u_ort, u, rtol=1e-4, atol=1e-5 * np.abs(u).max())
    assert report["onnx"]["ok"] and report["onnx"]["flipped"] == 0


def test_onnx_checker_and_strict_shape_inference(model):
    run, path = model
    report = check_onnx_graph(path, make_runner(path).info)
    assert report["outputs"]["codes"][0] == "uint8" and report["outputs"]["codes"][1][1] == 2
    assert report["outputs"]["u"][0] == "float32" and report["outputs"]["u"][1][1] == BITS


def test_glue_nodes_are_marked_fp32_and_network_nodes_are_not(model):
    nodes = onnx.load(model[1]).graph.node
    marked = {n.op_type for n in nodes if n.name.startswith(FP32_PREFIX)}
    unmarked = {n.op_type for n in nodes if not n.name.startswith(FP32_PREFIX)}
    assert {"ReduceMin", "ReduceMax", "GreaterOrEqual", "ReduceSum", "Cast"} <= marked
    assert {"Conv", "Gemm", "ConvTranspose"} <= unmarked and not {"Conv", "Gemm"} & marked


def test_codes_equal_the_packed_signs_of_the_trained_models_u(model):
    """Independent of the fused wrapper: DSaH.encode on x / 255, then the retrieval core's pack."""
    run, path = model
    net, _ = load_run(run)
    images = np.concatenate([np.random.default_rng(1).integers(0, 256, (9, 3, INPUT_SIZE, INPUT_SIZE), np.uint8),
                             scene_images(9, INPUT_SIZE, seed=1)])  # fmt: skip
    with torch.no_grad():
        u = net.encode(torch.from_numpy(images).float() / 255).numpy()
    with make_runner(path, "ort-cpu") as ort:
        codes, u_ort = ort.infer_with_u(images)
    expected = pack(binarize(u))
    flips = np.unpackbits(codes ^ expected, axis=1)[:, :BITS].astype(bool)
    assert flips.mean() <= 1e-3 and np.all(np.abs(u[flips]) < 1e-5 * np.abs(u).max())
    np.testing.assert_allclose(u_ort, u, rtol=1e-4, atol=1e-5 * np.abs(u).max())


def test_verify_reports_every_batch_on_random_and_real_images(model, reference):
    report = verify_model(model[1], reference, "ort-cpu")
    assert report["ok"], report["problems"]
    assert [(c["images"], c["batch"]) for c in report["cases"]] == [
        (kind, n) for kind in ("random", "real") for n in (1, 3, 17)
    ]
    assert report["agreement"] >= 0.999 and report["bits_compared"] == 2 * 21 * BITS
    assert all(c["packing_ok"] and c["max_u_diff"] < 1e-3 for c in report["cases"])


def test_verify_catches_a_broken_graph(model, reference, tmp_path):
    """Negating the hash layer turns u into -u, flipping every bit: verification must fail."""
    proto = onnx.load(model[1])
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]  # the hash layer: u = W h + b
    for init in proto.graph.initializer:
        if init.name in gemm.input[1:]:
            init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    report = verify_model(broken, reference, "ort-cpu")
    assert not report["ok"] and report["agreement"] < 0.1
    assert any("flipped" in p for p in report["problems"])
    assert any("|u| is" in p for p in report["problems"])


def test_verify_refuses_a_model_of_another_run(model, tmp_path):
    other = make_run(tmp_path / "other", seed=1)
    with make_runner(other, "torch") as ref:
        report = verify_model(model[1], ref, "ort-cpu")
    assert not report["ok"] and "fingerprint" in report["problems"][0]


def test_export_fails_loudly_and_writes_nothing_past_the_threshold(model, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(VerifyError, match="does not match PyTorch; not written") as info:
        export_run(model[0], out, tolerance={"flip_fraction": -1.0})
    assert "FAIL" in str(info.value) and "random" in str(info.value)  # the report table is in the message
    assert list(tmp_path.iterdir()) == []


def test_tolerances_loosen_with_precision():
    assert TOLERANCES["fp32"].flip_fraction < TOLERANCES["fp16"].flip_fraction <= TOLERANCES["bf16"].flip_fraction


def test_cli_export_and_verify(model, tmp_path):
    run, _ = model
    out = tmp_path / "m.onnx"
    cli = CliRunner()
    exported_ = cli.invoke(main, ["export", str(run), "--out", str(out), "--report", str(tmp_path / "r.json")])
    assert exported_.exit_code == 0, exported_.output
    assert "dynamo" in exported_.output and "agreement 1.000000" in exported_.output
    assert json.loads((tmp_path / "r.json").read_text())["onnx"]["ok"] is True
    verified = cli.invoke(main, ["verify", str(out), "--run", str(run), "--json", str(tmp_path / "v.json")])
    assert verified.exit_code == 0, verified.output
    assert "onnx.checker: ok" in verified.output and "PASS" in verified.output
    other = make_run(tmp_path / "other", seed=1)
    mismatch = cli.invoke(main, ["verify", str(out), "--run", str(other)])
    assert mismatch.exit_code == 1 and "does not match" in mismatch.output


def test_the_graph_normalises_with_what_the_config_says():
    from dsah_rt.errors import UserError
    from dsah_rt.export.fused import FusedEncoder
    from dsah_rt.train.methods import build_model

    net = build_model("dsah", "small", BITS, weights="none")
    FusedEncoder(net, net.config())
    with pytest.raises(UserError, match="normalisation mean"):
        FusedEncoder(net, {**net.config(), "mean": [0.5, 0.5, 0.5]})
