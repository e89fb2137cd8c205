"""The options of a training run (`TrainOptions`, config.json's `training`): defaults and checks.

Default optimiser: Adam 1e-3 with a cosine schedule, chosen for DSaH (with the squared J_sem below)
and for DPSH on a validation split (bench/results/train-evidence.md). SGD 0.01, the paper's
optimiser, diverges on digits in the first epoch: u is unbounded and the pairwise sums with
lambda = 30 give a first gradient far above DPSH's (README, "Training").

Saliency margin units: `margin_units="bits"` by default (see `saliency_loss`): d = k |S - (u.u+k)/2k|,
on which m = k/4 is a margin that can be met; in `"unit"` the hinge never switches off. The
experiment behind this choice is in bench/results/train-evidence.md.

Semantic norm: `semantic_norm="square"` by default, a departure from Eq. 6 read literally
(`"abs"`, |S - (u.u+k)/2k|; see `losses`). The absolute error pushes every dissimilar pair towards
u_i.u_j = -k with the same force however well it is already separated, which drowned the
similar-pair signal from a random init; the square's push fades as a pair nears its target, and
scored higher on the validation split (bench/results/train-evidence.md, "Semantic norm"). Eq. 9's
d_ij stays absolute. The square's gradient grows with the error, so it is the less forgiving of a
large step: with SGD 0.01 it went to NaN on a tiny test set where abs did not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dsah_rt.codes import MAX_BITS
from dsah_rt.errors import UserError
from dsah_rt.train.losses import ALPHA, DPSH_ETA, LAMBDA, NORMS, SIMULTANEOUS_ALPHA, SIMULTANEOUS_LAMBDA, Norm, Units
from dsah_rt.train.methods import METHODS, get_method

MODES = ("iterative", "simultaneous")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine", "step")
AUGMENTS = ("none", "crop", "crop+flip")
HASH_BACKBONES = ("tune", "frozen")
MIN_INPUT_SIZE = 32  # every backbone ends at stride 32: a smaller input has no c5 map
# Switches relative to the paper's best setting (Table 4's last row): hashing on J_sem, attention
# on J_sem + J_sal. "no-quantization" drops every J_reg term; "hash-no-ori" trains the hashing
# network on the saliency images only (a departure: what it encodes at deployment is Hash(y));
# "attention-identity" replaces the attention network by Salmap = 1 (y = x): the control that says
# what the attention adds under the same losses and schedule.
ABLATIONS = ("hash-sal", "hash-no-ori", "attention-no-sem", "attention-no-sal", "no-quantization", "attention-identity")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}

# Options that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "eval_every"})


@dataclass
class TrainOptions:
    """Everything that defines a training run, as written into config.json's `training`."""

    data: str = "synthetic-fg"
    data_options: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0
    method: str = "dsah"
    backbone: str = "small"
    bits: int = 12
    weights: str | None = None  # None: "imagenet" where the backbone has such weights, else "none"
    input_size: int | None = None  # None: the backbone's own
    # "frozen" trains the hash layer only (sec. 4.3: VGG-16 "is not finetuned"); at 64 px that left
    # DPSH and DSaH at chance from ImageNet weights where tuning learned (train-evidence.md, round 1)
    hash_backbone: str = "tune"
    mode: str = "iterative"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: float | None = None  # max l2 norm of a step's gradient (per image); None: no clipping
    schedule: str = "cosine"
    lam: float | None = None  # None: 30 (iterative) or 60 (simultaneous)
    alpha: float | None = None  # None: 40 (iterative) or 0.01 (simultaneous)
    margin: float | None = None  # None: k/4
    margin_units: Units = "bits"
    semantic_norm: Norm | None = None  # None: the method's own (dsah: "square", saliency-dpsh: "likelihood")
    eta: float = DPSH_ETA
    ablations: tuple[str, ...] = ()
    # DSaH: epochs that train the hashing network alone on the original images (lambda J_sem_ori +
    # J_reg_ori) before Algorithm 1 starts; 0 is the paper (its VGG-16 arrives trained on ImageNet).
    warmup_epochs: int = 0
    # DSaH: the last epochs train the hashing network alone on the saliency images, the attention
    # network frozen and the learning rate restarted: a network chasing a map that moves every epoch
    # learned less than one fitted to the settled map (train-evidence.md, round 1b, S2). 0: the paper.
    refit_epochs: int = 0
    area: float = 0.0  # DSaH: weight of the saliency map's mean area in Eq. 14 (0: the paper)
    augment: str = "none"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_every: int = 1  # evaluate (MAP, codes files) every N epochs, and always after the last

    def resolved(self) -> TrainOptions:
        """A copy with every None default filled in, validated."""
        checks = (("method", tuple(METHODS)), ("mode", MODES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                  ("augment", AUGMENTS), ("hash_backbone", HASH_BACKBONES), ("margin_units", ("bits", "unit")), ("semantic_norm", (None, *NORMS)))  # fmt: skip
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            raise UserError(f"unknown ablation {unknown[0]!r}; known: {', '.join(ABLATIONS)}")
        for name in ("epochs", "batch_size", "bits", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.bits > MAX_BITS:  # refused here, not by the first evaluation after a whole epoch
            raise UserError(f"bits must be at most {MAX_BITS}, got {self.bits}")
        if self.input_size is not None and self.input_size < MIN_INPUT_SIZE:
            raise UserError(f"input_size must be at least {MIN_INPUT_SIZE} (the backbones' stride), got {self.input_size}")
        for name in ("lr", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a positive number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("warmup_epochs", "refit_epochs"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs + self.refit_epochs > self.epochs:
            raise UserError(f"warmup_epochs + refit_epochs ({self.warmup_epochs} + {self.refit_epochs}) "
                            f"exceed epochs ({self.epochs})")
        if not (math.isfinite(self.area) and self.area >= 0):
            raise UserError(f"area must be >= 0, got {self.area}")
        if self.batch_size < 2:
            raise UserError("batch_size must be at least 2: the losses are over pairs within a batch")
        simultaneous = self.mode == "simultaneous"
        weights = self.weights or default_weights(self.backbone)
        method = get_method(self.method)
        resolved = TrainOptions(**{
            **asdict(self),
            "weights": weights,
            "lr": DEFAULT_LR[self.optimizer] if self.lr is None else self.lr,
            "lam": (SIMULTANEOUS_LAMBDA if simultaneous else LAMBDA) if self.lam is None else self.lam,
            "alpha": (SIMULTANEOUS_ALPHA if simultaneous else ALPHA) if self.alpha is None else self.alpha,
            "margin": self.bits / 4 if self.margin is None else self.margin,
            "ablations": tuple(sorted(set(self.ablations))),
            "semantic_norm": self.semantic_norm or method.default_semantic_norm,
        })  # fmt: skip
        method.check(resolved)
        return resolved


def default_weights(backbone: str) -> str:
    return "none" if backbone == "small" else "imagenet"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
