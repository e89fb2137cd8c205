"""The acceptance-table script: its rows are the configurations it names, and its table is the records'."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest

from click.testing import CliRunner

from dsah_rt.bench.attention_evidence import NUDGES, ROWS, TABLES, _run, main, read_records, table


def test_rows_are_the_defaults_plus_what_they_name() -> None:
    saliency, identity = ROWS["saliency"], ROWS["identity"]
    assert saliency == {"method": "dsah"} and ROWS["dpsh"] == {"method": "dpsh"}
    assert identity == {**saliency, "ablations": ("attention-identity",)}
    assert TABLES["table3"]["simultaneous"] == {**TABLES["table3"]["iterative"], "mode": "simultaneous"}
    assert TABLES["nowait"] == {"saliency-nowait": {**saliency, "attention_wait": 0.0}}
    assert TABLES["fcn16s"] == {"saliency-16s": {**saliency, "attention_wait": 0.0, "fcn": "16s"}}
    assert all(row["method"] == "dsah" for row in TABLES["table4"].values())
    lite0 = {"backbone": "efficientnet_lite0", "input_size": 64, "eval_every": 3}
    assert TABLES["lite0"] == {row: {**options, **lite0} for row, options in ROWS.items()}


def _records(maps: dict[tuple[str, int], list[float]], bits: int = 24) -> list[dict]:
    return [{"row": row, "bits": bits, "seed": s, "draw": d, "map_last3": m, "localisation": [1.0, 2.5 + s + d]}
            for (row, s), ms in maps.items() for d, m in enumerate(ms)]  # fmt: skip


def test_table_averages_draws_and_pairs_every_row_with_each_baseline() -> None:
    # seed 0: saliency draws 0.5 / 0.7 (mean 0.6), identity 0.5, dpsh 0.3; seed 1: 0.4, 0.45, 0.2.
    records = _records({("saliency", 0): [0.5, 0.7], ("identity", 0): [0.5], ("dpsh", 0): [0.3],
                        ("saliency", 1): [0.4], ("identity", 1): [0.45], ("dpsh", 1): [0.2]})  # fmt: skip
    md = table(records, list(ROWS))
    gains = np.array([0.6 - 0.5, 0.4 - 0.45])
    error = gains.std(ddof=1) / np.sqrt(2)
    summary = next(line for line in md.splitlines() if line.startswith("| 24 | **"))
    assert "**0.500** +- 0.141 (2 seeds, 3 runs)" in summary  # saliency: seed means 0.6 and 0.4
    assert f"{gains.mean():+.3f} +- {error:.3f} (1 of 2 seeds above 0)" in summary
    assert "+0.250 +- 0.050 (2 of 2 seeds above 0)" in summary  # saliency - dpsh: +0.3 and +0.2
    assert md.count("- identity (paired)") == 2 and "dpsh - identity" not in md
    assert "| 24 | 0 | 0.300 | 0.500 / 0.700 | 0.500 | +0.300 | +0.100 |" in md
    # localisation of every saliency run (2.5 + seed + draw), never of the identity's flat map
    assert "Localisation of saliency at 24 bits, last evaluation (1.0 = flat map): mean 3.17, min 2.50, 0 of 3" in md
    assert "Localisation of identity" not in md


def test_table_contrasts_the_default_with_each_departure_taken_back() -> None:
    records = _records({("saliency", 0): [0.6], ("saliency-nowait", 0): [0.55], ("saliency-16s", 0): [0.5, 0.6],
                        ("identity", 0): [0.4]})  # fmt: skip
    md = table(records, ["saliency", "identity", "saliency-nowait", "saliency-16s"])
    assert "saliency - saliency-nowait (paired)" in md and "saliency-nowait - saliency-16s (paired)" in md
    assert "| 24 | 0 | 0.600 | 0.400 | 0.550 | 0.500 / 0.600 | +0.200 | +0.150 | +0.150 | +0.050 | +0.000 |" in md


def test_table_pairs_only_the_seeds_both_rows_have() -> None:
    records = _records({("saliency", 0): [0.6], ("identity", 0): [0.5], ("saliency", 1): [0.9]})
    md = table(records, ["saliency", "identity"])
    assert "+0.100 +- nan (1 of 1 seeds above 0)" in md and "| 24 | 1 | 0.900 | - | - |" in md


def test_report_reads_several_files_in_table_order(tmp_path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"records": _records({("identity", 0): [0.5]})}))
    second.write_text(json.dumps({"records": _records({("saliency", 0): [0.6]})}))
    records, rows = read_records([str(first), str(second)])
    assert rows == ["saliency", "identity"] and len(records) == 2
    result = CliRunner().invoke(main, ["--report", str(first), "--report", str(second)])
    assert result.exit_code == 0 and result.output.strip() == table(records, rows)


@pytest.mark.parametrize("row", ["identity", "saliency"])
def test_a_row_trains_and_scores(row: str) -> None:
    options = {"num_classes": 2, "image_size": 32, "train_per_class": 8, "query_per_class": 2}
    with tempfile.TemporaryDirectory() as scratch:
        record = _run(("acceptance", row, 0, 8, 2, options, scratch, 0))
    assert record["row"] == row and 0 <= record["map_last3"] <= 1 and len(record["maps"]) == 1
    assert record["draw"] == 0 and record["lr"] == 3e-4
    share = record["map_stats"]["map_mean"]
    assert share == 1.0 if row == "identity" else 0 < share < 1  # Salmap = 1, or a min-max normalised map


def test_a_draw_nudges_the_learning_rate_and_nothing_else() -> None:
    options = {"num_classes": 2, "image_size": 32, "train_per_class": 8, "query_per_class": 2}
    runs = []
    for draw in (0, 0, 2):
        with tempfile.TemporaryDirectory() as scratch:
            runs.append(_run(("acceptance", "dpsh", 0, 8, 2, options, scratch, draw)))
    first, again, nudged = runs
    assert nudged["lr"] == 3e-4 * (1 + NUDGES[2]) and NUDGES[2] == -1e-6
    assert first["maps"] == again["maps"]  # a draw is the only thing that differs between runs of a cell


def test_rows_outside_the_table_are_refused(tmp_path) -> None:
    result = CliRunner().invoke(main, ["--out", str(tmp_path), "--rows", "nope", "--quick"])
    assert result.exit_code == 2 and "--rows nope: table acceptance has rows dpsh, saliency, identity" in result.output
    assert not list(tmp_path.iterdir())
