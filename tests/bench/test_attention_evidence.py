"""The acceptance-table script: its rows are the configurations it names, and its table is the records'."""

from __future__ import annotations

import tempfile

import pytest

from dsah_rt.bench.attention_evidence import ROWS, TABLES, _run, table


def test_rows_are_the_defaults_plus_what_they_name() -> None:
    saliency, identity = ROWS["saliency"], ROWS["identity"]
    assert saliency == {"method": "dsah"} and ROWS["dpsh"] == {"method": "dpsh"}
    assert identity == {**saliency, "ablations": ("attention-identity",)}
    assert TABLES["table3"]["simultaneous"] == {**TABLES["table3"]["iterative"], "mode": "simultaneous"}
    assert all(row["method"] == "dsah" for row in TABLES["table4"].values())
    lite0 = {"backbone": "efficientnet_lite0", "input_size": 64, "eval_every": 3}
    assert TABLES["lite0"] == {row: {**options, **lite0} for row, options in ROWS.items()}


def test_table_reports_every_seed_and_the_mean() -> None:
    records = [{"row": row, "bits": 12, "seed": s, "map_last3": 0.1 * (s + 1), "localisation": [1.0, 2.5 + s]}
               for row in ROWS for s in (0, 1)]  # fmt: skip
    md = table(records, list(ROWS), [12], [0, 1])
    assert "| 12 | 0.100 / 0.200; **0.150** | 0.100 / 0.200; **0.150** |" in md
    assert "saliency at the last evaluation (1.0 = flat map): 2.50, 3.50 (min 2.50)" in md
    assert "identity at the last" not in md


@pytest.mark.parametrize("row", ["identity", "saliency"])
def test_a_row_trains_and_scores(row: str) -> None:
    options = {"num_classes": 2, "image_size": 32, "train_per_class": 8, "query_per_class": 2}
    with tempfile.TemporaryDirectory() as scratch:
        record = _run(("acceptance", row, 0, 8, 2, options, scratch))
    assert record["row"] == row and 0 <= record["map_last3"] <= 1 and len(record["maps"]) == 1
