"""The acceptance-table script: its rows are the configurations it names, and its table is the records'."""

from __future__ import annotations

import tempfile

import pytest

from dsah_rt.bench.attention_evidence import DPSH_LR, ROWS, _run, table


def test_identity_row_is_the_saliency_row_with_the_attention_replaced() -> None:
    saliency, identity = ROWS["saliency"], ROWS["identity"]
    drop = lambda row: {k: v for k, v in row.items() if k != "ablations"}  # noqa: E731
    assert drop(identity) == drop(saliency) and saliency["method"] == "saliency-dpsh"
    assert set(identity["ablations"]) - set(saliency["ablations"]) == {"attention-identity"}
    assert ROWS["dpsh"]["method"] == "dpsh" and set(DPSH_LR) == {12, 24, 48}


def test_table_reports_every_seed_and_the_mean() -> None:
    records = [{"row": row, "bits": 12, "seed": s, "map_last3": 0.1 * (s + 1), "localisation": [1.0, 2.5 + s]}
               for row in ROWS for s in (0, 1)]  # fmt: skip
    md = table(records, [12], [0, 1])
    assert "| 12 | 0.100 / 0.200; **0.150** | 0.100 / 0.200; **0.150** |" in md
    assert "2.50, 3.50 (min 2.50)" in md


@pytest.mark.parametrize("row", ["identity", "saliency"])
def test_a_row_trains_and_scores(row: str) -> None:
    options = {"num_classes": 2, "image_size": 32, "train_per_class": 8, "query_per_class": 2}
    with tempfile.TemporaryDirectory() as scratch:
        record = _run((row, 0, 8, 2, options, scratch))
    assert record["row"] == row and 0 <= record["map_last3"] <= 1 and len(record["maps"]) == 1
