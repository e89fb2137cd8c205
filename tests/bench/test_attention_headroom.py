"""The attention-headroom bench: its oracle saliency image keeps exactly the part box."""

from __future__ import annotations

import numpy as np

from dsah_rt.bench.attention_headroom import headroom, oracle_split
from dsah_rt.train.data import load_dataset


def test_oracle_split_keeps_only_the_grown_box() -> None:
    split = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=3).train
    out = oracle_split(split, grow=1.0)
    for i in range(len(split)):
        x0, y0, x1, y1 = split.boxes[i]
        centres = np.arange(32) + 0.5
        keep_x = (centres >= x0 - 1) & (centres <= x1 + 1)
        keep_y = (centres >= y0 - 1) & (centres <= y1 + 1)
        keep = keep_y[:, None] & keep_x[None, :]
        assert np.array_equal(out.image(i)[keep], split.image(i)[keep])
        assert not out.image(i)[~keep].any() and keep.any() and not keep.all()
    assert np.array_equal(out.labels, split.labels)


def test_headroom_runs_both_inputs_for_every_seed() -> None:
    options = {"num_classes": 2, "image_size": 32, "train_per_class": 16, "query_per_class": 2}
    result = headroom([0, 1], epochs=1, bits=8, grow=2.0, data_options=options)
    assert [(r["input"].split()[-1], r["seed"]) for r in result["rows"]] == [("x", 0), ("x", 1), ("image", 0), ("image", 1)]
    assert all(0 <= r["map_last3"] <= 1 for r in result["rows"])
