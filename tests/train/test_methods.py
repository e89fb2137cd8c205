"""Methods are plug-ins: the trainer, CLI, config rebuild and exporter know none by name."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from dsah_rt.errors import UserError
from dsah_rt.train.cli import method_names
from dsah_rt.train.data import load_dataset
from dsah_rt.train.losses import dpsh_loss, semantic_loss, similarity
from dsah_rt.train.methods import METHODS, Phase, get_method, model_from_config, with_diagnostics
from dsah_rt.train.methods.dpsh import DPSHMethod
from dsah_rt.train.options import TrainOptions
from dsah_rt.train.run_dir import load_run
from dsah_rt.train.trainer import train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cli_choices_are_the_registered_methods() -> None:
    assert method_names() == sorted(METHODS) == ["dpsh", "dsah", "saliency-dpsh"]


def test_unknown_method_is_one_line() -> None:
    with pytest.raises(UserError, match="unknown method 'dsh'; known: dpsh, dsah, saliency-dpsh"):
        get_method("dsh")


class _SquaredDistance(DPSHMethod):
    """A method defined outside the package: DPSH's network on a plain squared code-distance loss."""

    name = "test-squared"

    def phases(self, model, opts, optimizer):
        def objective(model, x, S):
            u = torch.tanh(model(x))
            loss = ((u @ u.T / u.shape[1] - (2 * S - 1)) ** 2).sum()
            return with_diagnostics((loss, {"squared": float(loss.detach()), "total": float(loss.detach())}),
                                    u, None, S, opts)  # fmt: skip

        return [Phase("hashing", model, None, optimizer(model), objective)]


def test_a_method_is_one_registration(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(METHODS, "test-squared", _SquaredDistance())
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=8, query_per_class=2)
    opts = TrainOptions(method="test-squared", bits=8, input_size=32, batch_size=8, epochs=1, device="cpu")
    metrics = train(opts, tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    assert set(metrics[0]["loss"]["hashing"]) == {"squared", "total"}
    model, config = load_run(tmp_path)
    assert config["method"] == "test-squared" and type(model_from_config(config)).__name__ == "DPSH"


def test_saliency_dpsh_uses_the_likelihood_everywhere(tmp_path: Path) -> None:
    assert TrainOptions(method="saliency-dpsh").resolved().semantic_norm == "likelihood"
    assert TrainOptions(method="saliency-dpsh", recipe="paper").resolved().semantic_norm == "likelihood"
    with pytest.raises(UserError, match="does not apply to saliency-dpsh"):
        TrainOptions(method="saliency-dpsh", semantic_norm="square").resolved()
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=8, query_per_class=2)
    opts = TrainOptions(method="saliency-dpsh", bits=8, input_size=32, batch_size=8, epochs=1, device="cpu")
    metrics = train(opts, tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    assert "localisation" in metrics[0]
    _, config = load_run(tmp_path)
    assert config["method"] == "saliency-dpsh"
    u, S = torch.randn(6, 8, dtype=torch.float64), similarity(torch.tensor([0, 0, 1, 1, 2, 2]),
                                                                  torch.tensor([0, 0, 1, 1, 2, 2]))  # fmt: skip
    assert semantic_loss(u, S, 8, "likelihood") == pytest.approx(float(dpsh_loss(u, S, 0.0)))


def test_precision_scopes_must_exist() -> None:
    from dsah_rt.export.onnx_export import _network_scopes

    assert _network_scopes(get_method("dsah").build("small", 8, None)) == ("model.attention", "model.hashing")
    dpsh = get_method("dpsh").build("small", 8, None)
    assert _network_scopes(dpsh) == ("model.hashing",)
    dpsh.config = lambda: {"method": "dsah"}  # a model that does not have what its method names
    with pytest.raises(UserError, match="no submodule 'attention'"):
        _network_scopes(dpsh)


def test_hash_no_ori_trains_the_hashing_network_on_saliency_images_only(tmp_path: Path) -> None:
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=8, query_per_class=2)
    opts = TrainOptions(method="dsah", bits=8, input_size=32, batch_size=8, epochs=1, device="cpu",
                        ablations=("hash-no-ori",), attention_wait=0.0)  # Algorithm 1 from the first epoch  # fmt: skip
    metrics = train(opts, tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    assert set(metrics[0]["loss"]["hashing"]) == {"sem_sal", "reg_sal", "total"}
    with pytest.raises(UserError, match="hash-no-ori"):
        TrainOptions(ablations=("hash-sal", "hash-no-ori"), alpha=40.0).resolved()


@pytest.mark.parametrize("mode", ["iterative", "simultaneous"])
def test_recipes_fill_only_the_options_left_open(mode: str) -> None:
    measured = TrainOptions(method="dsah", mode=mode, epochs=60).resolved()
    paper = TrainOptions(method="dsah", mode=mode, epochs=60, recipe="paper").resolved()
    staged = mode == "iterative"
    assert (measured.semantic_norm, measured.alpha, measured.area) == ("likelihood", 0.0, 300.0)
    assert (measured.warmup_epochs, measured.warmup_liftoff, measured.attention_wait, measured.refit_epochs) == (
        (10, 0.0, 0.02, 20) if staged else (0, 0.0, 0.0, 0))  # fmt: skip
    assert (paper.semantic_norm, paper.area, paper.warmup_epochs, paper.warmup_liftoff, paper.attention_wait,
            paper.refit_epochs) == ("abs", 0.0, 0, 0.0, 0.0, 0)  # fmt: skip
    assert paper.alpha == (40.0 if staged else 0.01)
    assert (measured.fcn, paper.fcn) == ("8s", "16s") and TrainOptions(method="dsah", fcn="16s").resolved().fcn == "16s"
    given = TrainOptions(method="dsah", mode=mode, epochs=60, alpha=5.0, area=0.0, semantic_norm="square",
                         **({"warmup_epochs": 3, "refit_epochs": 0} if staged else {})).resolved()  # fmt: skip
    assert (given.alpha, given.area, given.semantic_norm, given.warmup_epochs, given.refit_epochs) == (
        5.0, 0.0, "square", 3 if staged else 0, 0)  # fmt: skip
    assert TrainOptions(method="dpsh").resolved().eta == 0.01
    assert TrainOptions(method="dpsh", recipe="paper").resolved().eta == 0.1
    assert TrainOptions(method="dpsh", eta=0.2).resolved().eta == 0.2
    assert TrainOptions(**vars(measured)).resolved() == measured  # resolving twice changes nothing


def test_a_zero_alpha_drops_j_sal_and_hash_sal_asks_for_one(tmp_path: Path) -> None:
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=8, query_per_class=2)
    opts = TrainOptions(bits=8, input_size=32, batch_size=8, epochs=1, device="cpu", warmup_epochs=0, refit_epochs=0,
                        attention_wait=0.0)
    metrics = train(opts, tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    assert set(metrics[0]["loss"]["attention"]) == {"sem_sal", "reg_sal", "area", "total"}
    with pytest.raises(UserError, match="hash-sal weights J_sal by --alpha"):
        TrainOptions(ablations=("hash-sal",)).resolved()
    assert TrainOptions(ablations=("hash-sal",), alpha=40.0).resolved().alpha == 40.0
