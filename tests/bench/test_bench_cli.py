"""`dsah-rt bench` end to end on tiny sizes: every backend listed, the JSON schema, markdown, plots."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from dsah_fixtures import BITS

from dsah_rt.bench.backends import BACKENDS
from dsah_rt.cli import main

FAST = ["--batch-sizes", "1,2", "--warmup-ms", "5", "--duration-s", "0.02", "--min-iters", "3", "--threads", "1"]


def bench(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bench", *FAST, *args])
    return result.exit_code, result.output


def test_default_model_every_backend_and_every_output(tmp_path):
    out, md, plots = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "plots"
    code, text = bench("--no-isolate", "--retrieval-db", "1500,3000", "--retrieval-queries", "20",
                       "--json", str(out), "--md", str(md), "--plots", str(plots))  # fmt: skip
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["format"] == "dsah-rt-bench/1" and list(report)[0] == "format"
    assert {"date", "machine", "versions", "settings", "model", "conventions", "encoding", "retrieval"} <= set(report)
    assert "randomly initialised" in report["model"]["description"]
    by_name = {r["backend"]: r for r in report["encoding"]}
    assert list(by_name) == [b.name for b in BACKENDS]  # none silently dropped
    for name in ("torch-cpu-fp32", "torch-cpu-fp32-cl", "ort-cpu"):
        r = by_name[name]
        assert r["status"] == "ok", r
        assert r["bit_agreement"]["agreement"] == 1.0 and r["model_bytes"] > 0 and r["peak_rss_mb"] > 0
        assert [row["batch"] for row in r["rows"]] == [1, 2]
        for row in r["rows"]:
            assert row["images_per_s"] > 0 and row["latency_ms"]["n"] >= 3
            assert row["latency_ms"]["min"] <= row["latency_ms"]["median"] <= row["latency_ms"]["p99"]
            assert len(row["latency_quantiles_ms"]) == 101
    for r in report["encoding"]:
        assert r["status"] == "ok" or r["reason"], r
        assert r["backend"] in text
    assert "--backends torch-cpu-compile" in by_name["torch-cpu-compile"]["reason"]
    assert len(report["retrieval"]["map"]) == 2
    assert all(m["max_abs_diff_vs_numpy_stable"] < 1e-12 for m in report["retrieval"]["map"])
    assert all(t["indices_consistent"] for t in report["retrieval"]["topk"])
    assert "| backend | status |" in md.read_text()
    assert (plots / "throughput.png").stat().st_size > 0 and (plots / "latency.png").stat().st_size > 0


def test_onnx_with_and_without_its_run(model, tmp_path):
    run, onnx_path = model
    out = tmp_path / "b.json"
    code, text = bench("--model", str(onnx_path), "--run", str(run), "--backends", "ort-cpu,torch-cpu-fp32",
                       "--no-isolate", "--no-retrieval", "--json", str(out))  # fmt: skip
    assert code == 0, text
    report = json.loads(out.read_text())
    assert [r["status"] for r in report["encoding"]] == ["ok", "ok"]
    assert report["model"]["bits"] == BITS
    assert all(r["bit_agreement"]["bits_compared"] == 32 * BITS for r in report["encoding"])

    code, text = bench("--model", str(onnx_path), "--backends", "ort-cpu,torch-cpu-fp32", "--no-isolate",
                       "--no-retrieval", "--json", str(out))  # fmt: skip
    assert code == 0, text
    ort, torch_cpu = json.loads(out.read_text())["encoding"]
    assert ort["status"] == "ok" and ort["bit_agreement"] is None
    assert torch_cpu["status"] == "unavailable" and "RUN_DIR" in torch_cpu["reason"]

    code, text = bench("--model", str(onnx_path), "--bits", "12", "--no-retrieval")
    assert code != 0 and "--bits picks the sub-run of a RUN_DIR" in text


def test_isolated_backend_reports_its_own_peak_memory(model, tmp_path):
    run, _ = model
    out = tmp_path / "b.json"
    code, text = bench("--model", str(run), "--backends", "ort-cpu", "--no-retrieval", "--json", str(out))
    assert code == 0, text
    (ort,) = json.loads(out.read_text())["encoding"]
    # A child that never imports torch stays far below a process that has it loaded.
    assert ort["status"] == "ok" and 0 < ort["peak_rss_mb"] < 400
    assert "peak_rss_note" not in ort


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "ort-cpu,nope"], "unknown backend nope"),
        (["--batch-sizes", "1,x"], "comma-separated integers"),
        (["--json", "/no/such/dir/b.json"], "does not exist"),
    ],
)
def test_bad_options_fail_in_one_line(args, message):
    code, text = bench(*args)
    assert code != 0 and message in text
