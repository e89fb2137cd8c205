"""The trainer: determinism, exact resume, freezing in Algorithm 1, outputs, localisation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dsah_rt.codes import read_codes, read_labels
from dsah_rt.errors import UserError
from dsah_rt.metrics import evaluate
from dsah_rt.train.data import load_dataset
from dsah_rt.train.evaluation import localisation
from dsah_rt.train.options import DEFAULT_LR, TrainOptions
from dsah_rt.train.run_dir import CONFIG, METRICS, load_checkpoint, load_run, run_fingerprint
from dsah_rt.train.trainer import Trainer, lr_factor, train

pytestmark = pytest.mark.usefixtures("single_thread")

TIMING = {"images_per_s", "train_seconds", "epoch_seconds"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-fg", seed=0, num_classes=3, image_size=32, train_per_class=6, query_per_class=2)


def _opts(**kw: Any) -> TrainOptions:
    # crop+flip and the attention head's dropout make the torch RNG matter for the resume test; the
    # paper recipe, so that each test switches on exactly the stages it checks.
    return TrainOptions(**{"bits": 8, "input_size": 32, "batch_size": 6, "epochs": 2, "augment": "crop+flip",
                           "device": "cpu", "recipe": "paper", **kw})  # fmt: skip


def _train(data, run_dir: Path, resume: bool = False, **kw: Any) -> list[dict[str, Any]]:
    return train(_opts(**kw), run_dir, data=data, resume=resume, echo=lambda line: None, progress=io.StringIO())


def _without_timing(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def test_same_seed_same_run(data, tmp_path: Path) -> None:
    a = _train(data, tmp_path / "a")
    b = _train(data, tmp_path / "b")
    c = _train(data, tmp_path / "c", seed=1)
    assert run_fingerprint(tmp_path / "a") == run_fingerprint(tmp_path / "b") != run_fingerprint(tmp_path / "c")
    assert _without_timing(a) == _without_timing(b)


@pytest.mark.parametrize("mode", ["iterative", "simultaneous"])
def test_resume_equals_uninterrupted(data, tmp_path: Path, mode: str) -> None:
    # SGD's default 0.01 sends the squared J_sem to NaN here, and NaN momentum never compares equal.
    kw = {"mode": mode, "lr": 1e-3}
    whole = _train(data, tmp_path / "whole", **kw)
    _train(data, tmp_path / "split", epochs=1, **kw)
    resumed = _train(data, tmp_path / "split", resume=True, **kw)
    assert run_fingerprint(tmp_path / "whole") == run_fingerprint(tmp_path / "split")
    assert _without_timing(resumed) == _without_timing(whole)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 2
    for name in a["optimizers"]:
        for pa, pb in zip(a["optimizers"][name]["state"].values(), b["optimizers"][name]["state"].values()):
            assert pa.keys() == pb.keys() and all(torch.equal(pa[key], pb[key]) for key in pa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for name in ("query_codes.npy", "db_codes.npy"):
        whole, split = (read_codes(tmp_path / run / name).packed for run in ("whole", "split"))
        assert np.array_equal(whole, split)


def test_resume_rules(data, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        _train(data, tmp_path, resume=True)
    _train(data, tmp_path, epochs=1)
    with pytest.raises(UserError, match="already holds a run"):
        _train(data, tmp_path, epochs=1)
    with pytest.raises(UserError, match="different lr"):
        _train(data, tmp_path, resume=True, lr=0.5)
    with pytest.raises(UserError, match="different semantic_norm"):
        _train(data, tmp_path, resume=True, semantic_norm="square")
    assert len(_train(data, tmp_path, resume=True, epochs=1)) == 1  # already done: nothing to train


def test_a_run_written_before_an_option_existed_resumes_under_its_old_behaviour(data, tmp_path: Path) -> None:
    _train(data, tmp_path, epochs=1, warmup_epochs=1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["training"]["warmup_liftoff"]  # as a checkpoint from before the option
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"different warmup_liftoff \(None in the run, 0.5 now\)"):
        _train(data, tmp_path, resume=True, epochs=2, warmup_epochs=1, warmup_liftoff=0.5)
    assert len(_train(data, tmp_path, resume=True, epochs=2, warmup_epochs=1)) == 2
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["training"]["fcn"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"different fcn \(None in the run, '8s' now\)"):
        _train(data, tmp_path, resume=True, epochs=3, warmup_epochs=1, fcn="8s")
    assert len(_train(data, tmp_path, resume=True, epochs=3, warmup_epochs=1)) == 3


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_iterative_freezes_the_other_network(data, tmp_path: Path) -> None:
    trainer = Trainer(_opts(), tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    model = trainer.model
    attention_phase, hashing_phase = trainer.phases
    assert [attention_phase.name, hashing_phase.name] == ["attention", "hashing"]  # attention first (sec. 4.3)

    att, hsh = _snapshot(model.attention), _snapshot(model.hashing)
    trainer.train_pass(attention_phase)
    assert not _changed(hsh, model.hashing), "hashing weights and BatchNorm statistics must not move"
    assert _changed(att, model.attention)
    assert all(p.requires_grad for p in model.hashing.parameters()), "freezing is undone after the pass"

    att, hsh = _snapshot(model.attention), _snapshot(model.hashing)
    trainer.train_pass(hashing_phase)
    assert not _changed(att, model.attention)
    changed = _changed(hsh, model.hashing)
    assert "hash_layer.weight" in changed and any("backbone" in k for k in changed)


def test_simultaneous_and_ablations_build_the_right_losses(data, tmp_path: Path) -> None:
    metrics = _train(data, tmp_path / "sim", mode="simultaneous", epochs=1)
    assert set(metrics[0]["loss"]) == {"joint"}
    assert set(metrics[0]["loss"]["joint"]) == {"sem_ori", "sem_sal", "sal", "reg_ori", "reg_sal", "total"}
    metrics = _train(data, tmp_path / "abl", epochs=1, ablations=("hash-sal", "attention-no-sem", "no-quantization"))
    assert set(metrics[0]["loss"]["attention"]) == {"sal", "total"}
    assert set(metrics[0]["loss"]["hashing"]) == {"sem_ori", "sem_sal", "sal", "total"}
    with pytest.raises(UserError, match="unknown ablation"):
        _opts(ablations=("nope",)).resolved()
    with pytest.raises(UserError, match="saliency methods only"):
        _opts(method="dpsh", mode="simultaneous").resolved()
    with pytest.raises(UserError, match="--fcn apply to the saliency methods only"):
        _opts(method="dpsh", fcn="8s").resolved()
    assert _opts(method="dpsh", fcn="16s").resolved().fcn == "16s"  # the neutral value, as config.json states it
    with pytest.raises(UserError, match="fcn must be one of 16s, 8s, got '4s'"):
        _opts(fcn="4s").resolved()


def test_dpsh_outputs_and_logged_map(data, tmp_path: Path) -> None:
    metrics = _train(data, tmp_path, method="dpsh", epochs=1, augment="none")
    logged = json.loads((tmp_path / METRICS).read_text())
    assert logged == json.loads(json.dumps(metrics))
    entry = logged[0]
    assert entry["epoch"] == 1 and set(entry["loss"]) == {"hashing"} and "localisation" not in entry
    assert entry["images_per_s"] > 0 and entry["train_bits_flipped"] is None
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["method"] == "dpsh" and config["input_size"] == 32 and config["training"]["lr"] == DEFAULT_LR["adam"]
    q, d = read_codes(tmp_path / "query_codes.npy"), read_codes(tmp_path / "db_codes.npy")
    assert q.bits == d.bits == 8 and len(q) == 6 and len(d) == 18
    assert q.model["fingerprint"] == run_fingerprint(tmp_path)
    ql = read_labels(tmp_path / "query_labels.npy", rows=len(q))
    dl = read_labels(tmp_path / "db_labels.npy", rows=len(d))
    assert evaluate(q.packed, d.packed, ql, dl, bits=q.bits).map == entry["map"]
    # The saved model reproduces the saved codes.
    model, _ = load_run(tmp_path)
    from dsah_rt.train.methods import get_method
    from dsah_rt.train.evaluation import encode_split, eval_loader

    codes, _ = encode_split(model, get_method("dpsh"), eval_loader(data.query, 32, False), torch.device("cpu"))
    assert np.array_equal(codes, q.packed)


def test_dsah_logs_localisation_and_code_flips(data, tmp_path: Path) -> None:
    metrics = _train(data, tmp_path, epochs=2)
    assert all(m["localisation"] > 0 for m in metrics)
    assert metrics[0]["train_bits_flipped"] is None and 0 <= metrics[1]["train_bits_flipped"] <= 1
    assert set(metrics[0]["loss"]["attention"]) == {"sal", "sem_sal", "reg_sal", "total"}
    assert set(metrics[0]["loss"]["hashing"]) == {"sem_ori", "sem_sal", "reg_ori", "reg_sal", "total"}


def test_localisation() -> None:
    salmap = torch.zeros(3, 1, 10, 10)
    salmap[0] = 1  # flat: no localisation
    salmap[1, 0, 2:4, 5:10] = 1  # exactly the box
    salmap[2, 0, 0, 0] = 1  # all mass outside
    boxes = torch.tensor([[5.0, 2.0, 10.0, 4.0]] * 3)
    torch.testing.assert_close(localisation(salmap, boxes), torch.tensor([1.0, 10.0, 0.0]))
    half = torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(localisation(half, torch.tensor([[0.5, 0.0, 1.5, 4.0]])), torch.tensor([1.0]))


def test_lr_factor() -> None:
    assert [lr_factor("none", e, 4) for e in range(4)] == [1.0] * 4
    assert [round(lr_factor("step", e, 4), 6) for e in range(4)] == [1.0, 1.0, 0.1, 0.01]
    assert lr_factor("cosine", 0, 4) == 1.0 and lr_factor("cosine", 2, 4) == pytest.approx(0.5)


def test_frozen_hash_backbone_trains_only_the_hash_layer(data, tmp_path: Path, monkeypatch) -> None:
    assert _opts().resolved().hash_backbone == "tune"
    trainer = Trainer(_opts(hash_backbone="frozen"), tmp_path, data=data, echo=lambda line: None,
                      progress=io.StringIO())  # fmt: skip
    model = trainer.model
    attention_phase, hashing_phase = trainer.phases
    hsh = _snapshot(model.hashing)
    trainer.train_pass(hashing_phase)
    # weights and BatchNorm running statistics of the backbone stay; the hash layer learns
    assert _changed(hsh, model.hashing) == {"hash_layer.weight", "hash_layer.bias"}
    assert not model.hashing.backbone.training and model.hashing.training
    att = _snapshot(model.attention)
    trainer.train_pass(attention_phase)
    assert _changed(att, model.attention), "the attention network still learns through the frozen backbone"
    assert not any(p.requires_grad for p in model.hashing.backbone.parameters())


def test_matched_initialisation_across_methods() -> None:
    from dsah_rt.train.methods import build_model

    states = []
    for method in ("dsah", "dpsh"):
        torch.manual_seed(7)
        states.append(build_model(method, "small", 12, weights=None).hashing.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_warmup_trains_the_hashing_network_alone_first(data, tmp_path: Path) -> None:
    trainer = Trainer(_opts(warmup_epochs=1, epochs=2), tmp_path, data=data, echo=lambda line: None,
                      progress=io.StringIO())  # fmt: skip
    att = _snapshot(trainer.model.attention)
    trainer._epoch()
    assert not _changed(att, trainer.model.attention)
    assert set(trainer.metrics[0]["loss"]) == {"warmup"}
    assert set(trainer.metrics[0]["loss"]["warmup"]) == {"sem_ori", "reg_ori", "total"}
    trainer._epoch()
    assert _changed(att, trainer.model.attention) and set(trainer.metrics[1]["loss"]) == {"attention", "hashing"}
    with pytest.raises(UserError, match="iterative mode only"):
        _opts(mode="simultaneous", warmup_epochs=2).resolved()


def _stage_names(stage) -> list[str]:
    return [phase.name for phase in stage.phases]


def test_warmup_goes_on_until_the_hashing_network_lifts_off() -> None:
    from dsah_rt.train.methods import build_model, get_method

    method = get_method("dsah")
    model = build_model("dsah", "small", 8, weights=None)

    def schedule(**kw: Any):
        opts = _opts(**{"warmup_epochs": 2, "warmup_liftoff": 0.1, "refit_epochs": 2, "epochs": 10, **kw}).resolved()
        return method.schedule(model, opts, method.phases(model, opts, lambda m: torch.optim.Adam(m.parameters())))

    def warm(ratio: float) -> dict[str, Any]:
        return {"loss": {"warmup": {}}, "diagnostics": {"warmup": {"sem_vs_chance": ratio}}}

    algorithm = {"loss": {"attention": {}, "hashing": {}}, "diagnostics": {}}
    pick = schedule()
    assert _stage_names(pick(1, [warm(0.5)])) == ["warmup"]  # the fixed part does not look
    assert _stage_names(pick(2, [warm(1.0), warm(0.95)])) == ["warmup"]  # still within 10% of chance
    assert _stage_names(pick(2, [warm(1.0), warm(0.85)])) == ["attention", "hashing"]
    assert _stage_names(pick(3, [warm(1.0), warm(0.85), algorithm])) == ["attention", "hashing"]  # ended stays ended
    assert _stage_names(pick(3, [warm(1.0)] * 3)) == ["warmup"]
    assert _stage_names(pick(4, [warm(1.0)] * 4)) == ["attention", "hashing"]  # at most twice warmup_epochs
    assert _stage_names(pick(8, [warm(1.0)] * 4 + [algorithm] * 4)) == ["refit"]
    assert _stage_names(schedule(warmup_liftoff=0.0)(2, [warm(1.0)] * 2)) == ["attention", "hashing"]
    assert _stage_names(schedule(epochs=6, refit_epochs=3)(3, [warm(1.0)] * 3)) == ["refit"]  # never into the refit
    with pytest.raises(UserError, match="warmup_liftoff must be in"):
        _opts(warmup_liftoff=1.0).resolved()
    with pytest.raises(UserError, match="pass --warmup-epochs"):
        _opts(warmup_liftoff=0.02).resolved()  # the paper's recipe has no warm-up to extend
    with pytest.raises(UserError, match="saliency methods only"):
        _opts(method="dpsh", warmup_liftoff=0.02).resolved()


def test_lift_off_is_measured_against_chance_and_resumes_alike(data, tmp_path: Path) -> None:
    # A lift-off of 99% below chance is out of reach here, so the warm-up runs to its cap of 2.
    kw = {"warmup_epochs": 1, "warmup_liftoff": 0.99, "epochs": 3, "lr": 1e-3}
    whole = _train(data, tmp_path / "whole", **kw)
    assert [sorted(m["loss"]) for m in whole] == [["warmup"], ["warmup"], ["attention", "hashing"]]
    pairs = 6 * 5 / 2  # batch 6; Eq. 6's |S - (u.u + k) / 2k| is 1/2 for every pair at u = 0
    for m in whole[:2]:
        assert m["diagnostics"]["warmup"]["sem_vs_chance"] == pytest.approx(m["loss"]["warmup"]["sem_ori"] / (pairs / 2))
    _train(data, tmp_path / "split", epochs=1, **{k: v for k, v in kw.items() if k != "epochs"})
    resumed = _train(data, tmp_path / "split", resume=True, **kw)
    assert _without_timing(resumed) == _without_timing(whole)


def test_attention_waits_for_the_hashing_network_to_lift_off() -> None:
    from dsah_rt.train.methods import build_model, get_method

    method = get_method("dsah")

    def schedule(identity: bool = False, **kw: Any):
        model = build_model("dsah", "small", 8, weights=None, identity_map=identity)
        opts = _opts(**{"warmup_epochs": 2, "attention_wait": 0.1, "refit_epochs": 2, "epochs": 10, **kw}).resolved()
        return method.schedule(model, opts, method.phases(model, opts, lambda m: torch.optim.Adam(m.parameters())))

    def entry(phase: str, ratio: float) -> dict[str, Any]:
        return {"loss": {phase: {}}, "diagnostics": {phase: {"sem_vs_chance": ratio}}}

    algorithm = {"loss": {"attention": {}, "hashing": {}}, "diagnostics": {"hashing": {"sem_vs_chance": 1.0}}}
    pick = schedule()
    warm = [entry("warmup", 1.0), entry("warmup", 0.95)]
    assert _stage_names(pick(1, warm[:1])) == ["warmup"]  # the warm-up stays fixed
    assert _stage_names(pick(2, warm)) == ["wait"]  # still within 10% of chance
    assert _stage_names(pick(2, [warm[0], entry("warmup", 0.85)])) == ["attention", "hashing"]
    assert _stage_names(pick(3, [*warm, entry("wait", 0.95)])) == ["wait"]
    assert _stage_names(pick(3, [*warm, entry("wait", 0.85)])) == ["attention", "hashing"]
    # once the attention has started it never waits again, even if the loss climbs back to chance
    assert _stage_names(pick(4, [*warm, entry("wait", 0.85), algorithm])) == ["attention", "hashing"]
    assert _stage_names(pick(8, [*warm] + [entry("wait", 1.0)] * 6)) == ["refit"]  # never into the refit
    assert _stage_names(schedule(warmup_epochs=0)(0, [])) == ["wait"]  # no warm-up: nothing has lifted off yet
    assert _stage_names(schedule(attention_wait=0.0)(2, warm)) == ["attention", "hashing"]
    assert _stage_names(schedule(identity=True)(2, warm)) == ["hashing"]  # the control has nothing to hold
    opts = _opts(attention_wait=0.1).resolved()
    assert method.remarks(opts, [*warm, entry("wait", 0.85), algorithm]) == []  # the attention did train
    assert method.remarks(opts, [*warm, entry("wait", 0.95), {"loss": {"refit": {}}}])[0].startswith(
        "the attention network was never trained")
    with pytest.raises(UserError, match="attention_wait must be in"):
        _opts(attention_wait=1.0).resolved()
    with pytest.raises(UserError, match="iterative mode only"):
        _opts(attention_wait=0.02, mode="simultaneous").resolved()
    with pytest.raises(UserError, match="saliency methods only"):
        _opts(method="dpsh", attention_wait=0.02).resolved()


def test_the_wait_is_the_identity_controls_hashing_pass(data, tmp_path: Path) -> None:
    # A lift-off 99% below chance is out of reach: DSaH waits for the whole run, and must then train
    # its hashing network exactly as the identity control (y = x) trains its own.
    kw = {"warmup_epochs": 1, "refit_epochs": 0, "epochs": 3, "lr": 1e-3, "recipe": "measured"}
    lines: list[str] = []
    waited = train(_opts(attention_wait=0.99, **kw), tmp_path / "wait", data=data, echo=lines.append,
                   progress=io.StringIO())  # fmt: skip
    assert lines[-1].startswith("the attention network was never trained: the hashing network had not lifted off")
    control = _train(data, tmp_path / "identity", ablations=("attention-identity",), **kw)
    assert [sorted(m["loss"]) for m in waited] == [["warmup"], ["wait"], ["wait"]]
    assert [m["loss"] for m in waited[1:]] == [{"wait": m["loss"]["hashing"]} for m in control[1:]]
    a, b = (load_checkpoint(tmp_path / run)["model"] for run in ("wait", "identity"))
    hashing = [k for k in b if k.startswith("hashing.")]
    assert hashing and all(torch.equal(a[k], b[k]) for k in hashing)
    assert [m["diagnostics"]["wait"]["sem_vs_chance"] for m in waited[1:]] == pytest.approx(
        [m["diagnostics"]["hashing"]["sem_vs_chance"] for m in control[1:]])
    config = json.loads((tmp_path / "wait" / CONFIG).read_text())
    assert config["training"]["attention_wait"] == 0.99


def test_refit_trains_the_hashing_network_alone_on_saliency_images_last(data, tmp_path: Path) -> None:
    trainer = Trainer(_opts(refit_epochs=2, epochs=3), tmp_path, data=data, echo=lambda line: None,
                      progress=io.StringIO())  # fmt: skip
    trainer._epoch()
    assert set(trainer.metrics[0]["loss"]) == {"attention", "hashing"}
    att, hashing = _snapshot(trainer.model.attention), _snapshot(trainer.model.hashing)
    trainer._epoch()
    assert not _changed(att, trainer.model.attention) and _changed(hashing, trainer.model.hashing)
    assert set(trainer.metrics[1]["loss"]) == {"refit"}
    assert set(trainer.metrics[1]["loss"]["refit"]) == {"sem_sal", "reg_sal", "total"}
    # the refit restarts the decay: its first epoch runs at the full rate, its second at half (cosine)
    assert trainer.metrics[1]["lr"] == pytest.approx(trainer.opts.lr)
    trainer._epoch()
    assert trainer.metrics[2]["lr"] == pytest.approx(trainer.opts.lr / 2)
    with pytest.raises(UserError, match="exceed epochs"):
        _opts(warmup_epochs=2, refit_epochs=2, epochs=3).resolved()
    with pytest.raises(UserError, match="saliency methods only"):
        _opts(method="dpsh", refit_epochs=1).resolved()


def test_attention_identity_is_hash_of_x_under_the_same_schedule(data, tmp_path: Path) -> None:
    trainer = Trainer(_opts(ablations=("attention-identity",), refit_epochs=1), tmp_path, data=data,
                      echo=lambda line: None, progress=io.StringIO())  # fmt: skip
    att = _snapshot(trainer.model.attention)
    trainer.fit()
    assert [set(m["loss"]) for m in trainer.metrics] == [{"hashing"}, {"refit"}]
    assert not _changed(att, trainer.model.attention)
    x = torch.rand(3, 3, 32, 32)
    model, _ = load_run(tmp_path)
    model.eval()
    assert model.identity_map and torch.equal(model.encode(x), model.hashing(x))


def test_eval_every_and_diagnostics(data, tmp_path: Path) -> None:
    metrics = _train(data, tmp_path, epochs=3, eval_every=2)
    assert ["map" in m for m in metrics] == [False, True, True]  # every 2nd, and always the last
    assert read_codes(tmp_path / "query_codes.npy").model["epoch"] == 3
    att = metrics[0]["diagnostics"]["attention"]
    assert {"u_abs_mean", "u_abs_max", "d", "d_sal", "hinge_active", "map_mean", "map_entropy", "grad_norm"} <= set(att)
    assert 0 <= att["hinge_active"] <= 1 and 0 < att["map_entropy"] <= 1 + 1e-6 and att["grad_norm"] > 0
    assert set(metrics[0]["diagnostics"]["hashing"]) >= {"d", "d_sal", "grad_norm"}
