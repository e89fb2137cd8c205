"""The GPU script's whole path on the CPU (--device cpu --tiny): schema, budget, CUDA paths listed."""

from __future__ import annotations

import json

from click.testing import CliRunner

from dsah_rt.bench import gpu


def test_tiny_cpu_run_writes_the_full_schema(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(gpu.main, ["--out", str(out), "--device", "cpu", "--tiny", "--budget-s", "60"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["stopped"] is None and report["seconds"] < 60
    assert {"date", "machine", "versions", "gpu", "peaks", "models", "unavailable", "load_start", "load_end"} <= set(report)
    assert report["peaks"][0]["precision"] == "fp32" and report["peaks"][0]["tflops"] > 0
    # Every CUDA-only variant is listed with the reason it did not run here.
    assert {u["variant"] for u in report["unavailable"]} == set(gpu.CUDA_VARIANTS)
    assert all(u["reason"] for u in report["unavailable"])
    (model,) = report["models"]
    assert model["backbone"] == "small" and model["flops_per_image"] > 0
    assert [v["variant"] for v in model["variants"]] == list(gpu.CPU_VARIANTS)
    for variant in model["variants"]:
        assert [r["batch"] for r in variant["rows"]] == [1, 2]
        for row in variant["rows"]:
            assert row["status"] == "ok"
            assert row["images_per_s"] > 0 and 0 < row["fraction_of_peak"]
            assert row["latency_ms"]["n"] >= 3


def test_budget_skips_cells_instead_of_overrunning(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu.run(out, "cpu", tiny=True, budget_s=0.0, batch_sizes=[1], duration_s=0.05)
    rows = [r for m in report["models"] for v in m["variants"] for r in v["rows"]]
    assert rows and all(r == {"batch": 1, "status": "skipped", "reason": "time budget"} for r in rows)
    assert json.loads(out.read_text())["models"] == report["models"]
