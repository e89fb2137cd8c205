"""Training methods by name. A method is one file here that registers a `Method`: everything the
trainer, the CLI, the config rebuild and the exporter need to know about it. The trainer knows no
method by name.

    dsah           the paper: attention + hashing networks, Algorithm 1 or Eq. 18 (dsah.py)
    dpsh           the DPSH baseline (DPSH++ on the same backbone): the hashing network alone (dpsh.py)
    saliency-dpsh  DSaH's attention network and quadruple saliency loss around DPSH's pair
                   likelihood instead of Eq. 6, so the attention is measured apart from J_sem
                   (saliency_dpsh.py)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsah_rt.errors import UserError

if TYPE_CHECKING:
    from dsah_rt.train.options import TrainOptions

# (model, images, S) -> (loss, its unweighted terms and "total", diagnostics: |u|, d/d', hinge, map)
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float], dict[str, float]]]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Phase:
    """One pass over the training set: `trains` is updated by `optimizer` on `objective`, `frozen` is not."""

    name: str
    trains: nn.Module
    frozen: nn.Module | None
    optimizer: torch.optim.Optimizer
    objective: Objective


@dataclass(frozen=True)
class Stage:
    """What an epoch runs: its passes, and the epochs [start, start + length) over which the
    learning-rate schedule decays (a stage that re-fits a network restarts it)."""

    phases: list[Phase]
    start: int
    length: int


Schedule = Callable[[int, list[dict]], Stage]  # (0-based epoch, metrics of the epochs before it) -> its stage


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """No gradients for `module`'s parameters and eval mode (fixed BatchNorm statistics, no dropout)."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def with_diagnostics(
    objective: tuple[torch.Tensor, dict[str, float]], u: torch.Tensor, u_sal: torch.Tensor | None,
    S: torch.Tensor, opts: TrainOptions, salmap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """An objective's (loss, terms) with the diagnostics metrics.json logs beside them."""
    from dsah_rt.train.losses import diagnostics, map_statistics

    logged = diagnostics(u, u_sal, S, u.shape[1], opts.margin, opts.margin_units)
    if salmap is not None:
        logged.update(map_statistics(salmap))
    return (*objective, logged)


class Method:
    """What a training method is; subclasses override what differs.

    `has_attention`: the model has a saliency map (localisation is logged, Eq. 17 encodes through it).
    `precision_scopes`: the submodules that may run in fp16/bf16 in an engine; every other layer
    of the exported graph (cast, min-max, multiply, sign, packing) stays fp32.
    """

    name: str = ""
    summary: str = ""
    has_attention: bool = False
    precision_scopes: tuple[str, ...] = ("hashing",)
    semantic_norms: tuple[str, ...] = ("abs", "square", "likelihood")

    def defaults(self, opts: TrainOptions) -> dict[str, Any]:
        """Values for the options `opts` leaves at None, by `opts.recipe` (train/options.py); an
        option a method does not use gets its neutral value, so config.json states every one."""
        from dsah_rt.train.losses import ALPHA, DPSH_ETA, SIMULTANEOUS_ALPHA

        return {"semantic_norm": "square", "alpha": SIMULTANEOUS_ALPHA if opts.mode == "simultaneous" else ALPHA,
                "eta": DPSH_ETA, "area": 0.0, "warmup_epochs": 0, "warmup_liftoff": 0.0, "refit_epochs": 0,
                "attention_wait": 0.0, "fcn": "16s"}  # fmt: skip

    def check(self, opts: TrainOptions) -> None:
        """Refuse option combinations the method cannot honour, with one line each."""

    def build(self, backbone: str, bits: int, weights: Any = "imagenet", **arch: Any) -> nn.Module:
        """The model, its backbones loaded with `weights` ("imagenet", None or a state-dict path)."""
        raise NotImplementedError

    def architecture(self, config: dict[str, Any]) -> dict[str, Any]:
        """The `build` keywords a run's config records beyond backbone and bits."""
        return {}

    def architecture_from_options(self, opts: TrainOptions) -> dict[str, Any]:
        """The `build` keywords that training options ask for (e.g. an ablated network)."""
        return {}

    def phases(self, model: nn.Module, opts: TrainOptions, optimizer: OptimizerFactory) -> list[Phase]:
        """The passes of one epoch, in order, each with its own optimiser."""
        raise NotImplementedError

    def schedule(self, model: nn.Module, opts: TrainOptions, phases: list[Phase]) -> Schedule:
        """Which passes each epoch runs; by default every phase, every epoch, one decay over the run."""
        every = Stage(phases, 0, opts.epochs)
        return lambda epoch, history: every

    def remarks(self, opts: TrainOptions, metrics: list[dict]) -> list[str]:
        """Lines for the user about a finished run that its MAP does not show."""
        return []

    @torch.no_grad()
    def encode(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u of the deployed code, the saliency map or None) for images in [0, 1]."""
        return model.encode(x), None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def build_model(method: str, backbone: str, bits: int, weights: Any = "imagenet", **arch: Any) -> nn.Module:
    """Build a model by method name; `arch` goes to that method's builder (e.g. fc_channels)."""
    return get_method(method).build(backbone, bits, weights, **arch)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture a `config()` describes, randomly initialised, ready for a state dict.

    Random init is right here: the checkpoint's state dict overwrites every parameter, and the
    original pretrained file may not exist where the checkpoint is loaded.
    """
    method = get_method(config["method"])
    return method.build(config["backbone"], config["bits"], None, **method.architecture(config))


def _register_all() -> None:
    """Import every module of this package: each registers its method, so a new method is a new file
    (named like the method, '-' as '_': the CLI lists the files without importing torch)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
