"""The options of a training run (`TrainOptions`, config.json's `training`): defaults and checks.

Recipes: an option left at None takes its value from the run's `recipe`, through the method's
`defaults` (train/methods/). `measured` (the default) is what the validation splits of
bench/results/train-evidence.md chose; `paper` is the paper's reading of every one of those
departures (Algorithm 1 from the first epoch to the last, Eq. 6's absolute J_sem, alpha = 40, no
area term; DPSH's eta = 0.1). An option given explicitly wins over either recipe.

Default optimiser: Adam 3e-4 with a cosine schedule, chosen on the validation split for the
saliency method and for DPSH at 24 and 48 bits (at 12 bits DPSH preferred 1e-3 by 0.02, within a
seed's spread; train-evidence.md, "Issue 8, round 2"); at 1e-3 one seed in three of the saliency
method never lifted off at 24 and 48 bits. SGD 0.01, the paper's optimiser, diverges on digits in
the first epoch: u is unbounded and the pairwise sums with lambda = 30 give a first gradient far
above DPSH's (README, "Training").

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
from dsah_rt.train.losses import LAMBDA, NORMS, SIMULTANEOUS_LAMBDA, Norm, Units
from dsah_rt.train.models import FCNS
from dsah_rt.train.methods import METHODS, get_method

MODES = ("iterative", "simultaneous")
RECIPES = ("measured", "paper")
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
DEFAULT_LR = {"sgd": 0.01, "adam": 3e-4}

# Options that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "eval_every"})
# Options added after run folders were written, each with the value that trains as those runs did:
# a checkpoint whose config lacks one resumes under that value.
ADDED_OPTIONS = {"warmup_liftoff": 0.0, "fcn": "16s", "attention_wait": 0.0}


@dataclass
class TrainOptions:
    """Everything that defines a training run, as written into config.json's `training`."""

    data: str = "synthetic-fg"
    data_options: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0
    method: str = "dsah"
    recipe: str = "measured"  # where the None options below take their values (module docstring)
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
    alpha: float | None = None  # None: the recipe's (measured 0; paper 40 iterative, 0.01 simultaneous)
    margin: float | None = None  # None: k/4
    margin_units: Units = "bits"
    semantic_norm: Norm | None = None  # None: the recipe's (measured "likelihood"; paper dsah "abs")
    eta: float | None = None  # DPSH's quantization weight; None: the recipe's (measured 0.01, paper 0.1)
    ablations: tuple[str, ...] = ()
    # DSaH: epochs that train the hashing network alone on the original images (lambda J_sem_ori +
    # J_reg_ori) before Algorithm 1 starts; 0 is the paper (its VGG-16 arrives trained on ImageNet).
    # None: the recipe's (measured epochs / 6).
    warmup_epochs: int | None = None
    # DSaH: the warm-up goes on past warmup_epochs (to at most twice as many) until the hashing
    # network has lifted off: its warm-up J_sem_ori at least this share below its value at u = 0
    # (chance); from a random init lift-off comes at epochs 11-25 of 60 (round 6). None: 0, a fixed
    # warm-up, under both recipes (0.02 lowered the identity control, not DSaH: round 6).
    warmup_liftoff: float | None = None
    # DSaH: after the warm-up, Algorithm 1's attention pass waits until the hashing network has lifted
    # off (its J_sem on the original images at least this share below chance), the hashing pass
    # meanwhile training on the originals as the identity control's does (y = x): an attention
    # trained against a network at chance shrinks the map with no direction and holds that network
    # back (round 7, seed 14). 0: no wait (the paper). None: the recipe's.
    attention_wait: float | None = None
    # DSaH: the last epochs train the hashing network alone on the saliency images, the attention
    # network frozen and the learning rate restarted: a network chasing a map that moves every epoch
    # learned less than one fitted to the settled map (train-evidence.md, round 2). 0: the paper;
    # None: the recipe's (measured epochs / 3).
    refit_epochs: int | None = None
    area: float | None = None  # DSaH: weight of the map's mean area in Eq. 14 (paper 0; None: the recipe's)
    # DSaH: the attention network's finest score, FCN-16s (the paper's) or FCN-8s (a stride-8 grid:
    # 8 x 8 at 64 px, where FCN-16s scores 4 x 4). None: the recipe's (measured 8s, paper 16s).
    fcn: str | None = None
    augment: str = "none"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_every: int = 1  # evaluate (MAP, codes files) every N epochs, and always after the last

    def resolved(self) -> TrainOptions:
        """A copy with every None default filled in, validated."""
        checks = (("method", tuple(METHODS)), ("recipe", RECIPES), ("mode", MODES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                  ("augment", AUGMENTS), ("hash_backbone", HASH_BACKBONES), ("margin_units", ("bits", "unit")), ("semantic_norm", (None, *NORMS)), ("fcn", (None, *FCNS)))  # fmt: skip
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(a for a in allowed if a)}, got {getattr(self, name)!r}")
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
        for name in ("lr", "clip_grad", "eta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a positive number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("warmup_epochs", "refit_epochs", "num_workers", "alpha", "area"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be >= 0, got {value}")
        for name in ("warmup_liftoff", "attention_wait"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1), got {value}")
        if self.batch_size < 2:
            raise UserError("batch_size must be at least 2: the losses are over pairs within a batch")
        simultaneous = self.mode == "simultaneous"
        method = get_method(self.method)
        given = {name: value for name, value in asdict(self).items() if value is not None}
        resolved = TrainOptions(**{
            "weights": default_weights(self.backbone),
            "lr": DEFAULT_LR[self.optimizer],
            "lam": SIMULTANEOUS_LAMBDA if simultaneous else LAMBDA,
            "margin": self.bits / 4,
            **method.defaults(self),
            **given,
            "ablations": tuple(sorted(set(self.ablations))),
        })  # fmt: skip
        if resolved.warmup_epochs + resolved.refit_epochs > resolved.epochs:
            raise UserError(f"warmup_epochs + refit_epochs ({resolved.warmup_epochs} + {resolved.refit_epochs}) "
                            f"exceed epochs ({resolved.epochs})")
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
