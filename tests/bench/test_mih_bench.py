"""The MIH benchmark end to end on a small database: every method in its own process, MIH exact against
the brute force, and the paired run's speed-ups consistent with its own times."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from dsah_rt.bench.mih_bench import main


def test_mih_bench_small_run_is_exact_and_reports_its_pairs(tmp_path):
    out = tmp_path / "mih.json"
    result = CliRunner().invoke(main, ["--n", "20000", "--bits", "32", "--data", "clustered", "--queries", "40",
                                       "--repeat", "2", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = json.loads(out.read_text())["runs"]
    rows = {row["method"]: row for row in run["rows"]}
    assert rows["mih"]["same_indices"] and rows["mih (probing alone)"]["same_indices"]
    assert rows["faiss Flat"]["same_distances"]
    pairs = run["paired"]
    assert pairs["same_results"]
    expected = np.array(pairs["brute_force_times_s"]) / np.array(pairs["mih_times_s"])
    assert len(pairs["speedups"]) == 2 and np.allclose(pairs["speedups"], expected)
    assert pairs["speedup_median"] == np.median(expected)
    assert f"{pairs['speedup_median']:.1f}x median of" in result.output
