"""Run folders: checkpoint round trip, fingerprint, sub-run layout, clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dsah_rt.errors import UserError
from dsah_rt.train.methods import build_model
from dsah_rt.train.run_dir import CHECKPOINT, CONFIG, METRICS, capture_rng_states, load_run, resolve_run_dir, resolved_config, restore_rng_states, run_fingerprint, save_checkpoint, sub_run_dir

pytestmark = pytest.mark.usefixtures("single_thread")


def _save(run_dir: Path, bits: int = 12, method: str = "dsah", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(method, "small", bits, weights="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = resolved_config(model, 32, {"epochs": 1}, weights_source="none (random init)")
    metrics = [{"epoch": 1, "map": 0.5}]
    save_checkpoint(run_dir, model, {"sgd": opt.state_dict()}, 1, config, capture_rng_states(), metrics)
    return model


def test_round_trip(tmp_path: Path) -> None:
    model = _save(tmp_path, method="dsah")
    loaded, config = load_run(tmp_path)
    assert not loaded.training
    assert config["method"] == "dsah" and config["bits"] == 12 and config["input_size"] == 32
    assert config["weights_source"] == "none (random init)" and config["training"] == {"epochs": 1}
    assert json.loads((tmp_path / CONFIG).read_text()) == config
    assert json.loads((tmp_path / METRICS).read_text()) == [{"epoch": 1, "map": 0.5}]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.eval().encode(x), loaded.encode(x))
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"


def test_fingerprint_depends_on_weights_only(tmp_path: Path) -> None:
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=0)
    _save(tmp_path / "c", seed=1)
    a = run_fingerprint(tmp_path / "a")
    assert a == run_fingerprint(tmp_path / "b") != run_fingerprint(tmp_path / "c")
    assert len(a) == 64


def test_rng_states_round_trip(tmp_path: Path) -> None:
    states = capture_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(states, tmp_path / "rng.pt")
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_sub_runs(tmp_path: Path) -> None:
    assert sub_run_dir(tmp_path, 12, [12]) == tmp_path
    for bits in (12, 24):
        _save(sub_run_dir(tmp_path, bits, [12, 24]), bits=bits)
    assert load_run(tmp_path, bits=24)[1]["bits"] == 24
    assert resolve_run_dir(tmp_path, 12) == tmp_path / "bits-12"
    with pytest.raises(UserError, match="12, 24 bits"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="no run for 48 bits"):
        load_run(tmp_path, bits=48)
    (tmp_path / "bits-24" / CHECKPOINT).unlink()
    assert load_run(tmp_path)[1]["bits"] == 12  # a single sub-run needs no choice
    with pytest.raises(UserError, match="holds a 12-bit run, not 24 bits"):
        load_run(tmp_path / "bits-12", bits=24)
    with pytest.raises(UserError, match="holds a 12-bit run, not 24 bits"):  # what `export --bits` resolves
        resolve_run_dir(tmp_path / "bits-12", 24)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run folder not found"):
        load_run(tmp_path / "missing")
    with pytest.raises(UserError, match="not a dsah-rt run"):
        load_run(tmp_path)
    (tmp_path / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable dsah-rt checkpoint"):
        load_run(tmp_path)
    torch.save({"model": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(UserError, match="not a dsah-rt run checkpoint"):
        load_run(tmp_path)
