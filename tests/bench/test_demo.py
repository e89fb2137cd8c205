"""The main job end to end, shortened to one epoch and a tiny benchmark (the full run is `make demo`),
and its command's options."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from cli_checks import assert_one_line_error
from dsah_rt.bench.demo import TRAINING, run_demo
from dsah_rt.cli import main
from dsah_rt.codes import read_codes


def test_main_job_runs_every_stage(tmp_path):
    report = run_demo(tmp_path, epochs=1, bench=False, echo=lambda line: None)
    index = (tmp_path / "index.md").read_text()
    for section in ("Retrieval quality", "Export", "Encode", "Encoding benchmark", "ort-cpu", "Retrieval core benchmark"):
        assert section in index
    # The exported graph run by ONNX Runtime on the PNG folder reproduces the trainer's codes.
    assert report["onnx_encoded_eval"]["bit_agreement_with_trainer_codes"] >= 0.999
    assert report["export"]["onnx"]["ok"]
    assert set(report["results"]) == {"DSaH", "DPSH"}
    for m in report["results"].values():
        assert 0 <= m["map_tie_worst"] <= m["map_tie_aware"] <= m["map_tie_best"] <= 1
    q = read_codes(tmp_path / "query_codes.npy")
    assert q.bits == 24 and len(q) == report["sizes"]["query"] and not q.skipped
    assert (tmp_path / "pr.png").stat().st_size > 0
    assert len(list((tmp_path / "saliency").glob("*.png"))) == 8
    saved = json.loads((tmp_path / "report.json").read_text())
    assert np.isclose(saved["results"]["DSaH"]["map"], report["results"]["DSaH"]["map"])
    # A second demo into the same folder (`make demo` twice, or after an interruption) continues
    # the finished runs, training nothing, and gives the same codes.
    lines: list[str] = []
    again = run_demo(tmp_path, epochs=1, bench=False, echo=lines.append)
    assert sum("continuing the" in line for line in lines) == 2
    timings = {"seconds", "load_seconds"}
    for name, m in report["results"].items():
        assert {k: v for k, v in again["results"][name].items() if k not in timings} == {
            k: v for k, v in m.items() if k not in timings}


def test_zero_epochs_is_refused_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "0"])
    assert_one_line_error(res, "--epochs must be at least 1, got 0", tmp_path, "demo")


def test_help_states_the_default_budget():
    res = CliRunner().invoke(main, ["demo", "--help"])
    assert f"(default {TRAINING['epochs']}, the demo's budget); a run already in --out is continued" in " ".join(
        res.output.split())
