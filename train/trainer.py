"""Training: the loop over a method's phases (train/methods/), evaluation, checkpoints and resume.

An epoch runs the phases the method names (DSaH's Algorithm 1: attention, then hashing; its
warm-up; Eq. 18's joint pass; DPSH's one pass), each a pass over the training set with its own
optimiser, then evaluates every `eval_every` epochs: codes of the query and database splits
through the deployed function (`Method.encode`, Eq. 17 for DSaH), MAP, localisation where boxes
exist, and `train_bits_flipped`, the share of B's bits (the training set's codes) that changed
since the previous evaluation (the paper's Fig. 6 in one number).

Loss scale: the objectives are sums over the N(N-1)/2 pairs of a batch, as the paper writes them,
and the weights lambda/alpha are calibrated against those sums. The trainer divides each total by
the batch size N before the backward pass: every ratio between terms stays the paper's and only
the step is rescaled, so learning rates are per image. Default: Adam 1e-3 with a cosine schedule,
chosen for DSaH (with the squared J_sem below) and for DPSH on a validation split
(bench/results/train-evidence.md). SGD 0.01, the paper's optimiser, diverged on digits in the
first epoch (max|u| 0.6 -> 5.4 -> 22 -> 1e8 over four batches: u is unbounded and the pairwise
sums with lambda = 30 give a first gradient ~10x DPSH's). Full batches only
(`drop_last`): a short last batch has fewer pairs per image, so a differently weighted loss.

Saliency margin units: `margin_units="bits"` by default (see `saliency_loss`): d = k |S - (u.u+k)/2k|,
on which m = k/4 is a margin that can be met; in `"unit"` the hinge never switches off. The
experiment behind this choice is in bench/results/train-evidence.md.

Semantic norm: `semantic_norm="square"` by default, a departure from Eq. 6 read literally
(`"abs"`, |S - (u.u+k)/2k|; see `losses`). The absolute error pushes every dissimilar pair towards
u_i.u_j = -k with the same force however well it is already separated, which drowned the
similar-pair signal from a random init; the square's push fades as a pair nears its target. On the
validation split DSaH's MAP (12 bits, 4 seeds) was 0.545 with the square against 0.412 with the
absolute error (bench/results/train-evidence.md, "Semantic norm"). Eq. 9's d_ij stays absolute.
The square's gradient grows with the error, so it is the less forgiving of a large step: with SGD
0.01 it went to NaN on a tiny test set where abs did not (on synthetic-fg at 64 px both did).

Determinism: same seed, same device (CPU) and thread count, same result. The model is initialised
from `seed`; the shuffling uses its own generator; augmentation and dropout use torch's global RNG
(evaluation loaders have their own, so evaluating does not move it). The checkpoint
written after every epoch holds all of these states, so `resume=True` continues exactly where an
interrupted run stopped: a resumed run equals an uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dsah_rt.atomic import atomic_write
from dsah_rt.codes import binarize, pack, write_codes
from dsah_rt.errors import UserError
from dsah_rt.metrics import evaluate
from dsah_rt.train import losses as L
from dsah_rt.train import run as R
from dsah_rt.train.data import RetrievalData, load_dataset
from dsah_rt.train.data.torch_dataset import TorchSplit
from dsah_rt.train.methods import METHODS, Method, Phase, frozen, get_method, model_from_config

MODES = ("iterative", "simultaneous")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine", "step")
AUGMENTS = ("none", "crop", "crop+flip")
HASH_BACKBONES = ("tune", "frozen")
# Switches relative to the paper's best setting (Table 4's last row): hashing on J_sem, attention
# on J_sem + J_sal. "no-quantization" drops every J_reg term; "hash-no-ori" trains the hashing
# network on the saliency images only (a departure: what it encodes at deployment is Hash(y)).
ABLATIONS = ("hash-sal", "hash-no-ori", "attention-no-sem", "attention-no-sal", "no-quantization")
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
EVAL_BATCH = 128


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
    margin_units: L.Units = "bits"
    semantic_norm: L.Norm | None = None  # None: the method's own (dsah: "square", saliency-dpsh: "likelihood")
    eta: float = L.DPSH_ETA
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
                  ("augment", AUGMENTS), ("hash_backbone", HASH_BACKBONES), ("margin_units", ("bits", "unit")), ("semantic_norm", (None, *L.NORMS)))  # fmt: skip
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            raise UserError(f"unknown ablation {unknown[0]!r}; known: {', '.join(ABLATIONS)}")
        for name in ("epochs", "batch_size", "bits", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
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
            "lam": (L.SIMULTANEOUS_LAMBDA if simultaneous else L.LAMBDA) if self.lam is None else self.lam,
            "alpha": (L.SIMULTANEOUS_ALPHA if simultaneous else L.ALPHA) if self.alpha is None else self.alpha,
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


# ------------------------------------------------------------------------------------ phases


def _optimizer(opts: TrainOptions, module: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for 0-based `epoch`: a pure function of it, so resuming needs no state."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "step":  # x0.1 after half the epochs and again after three quarters
        return 0.1 ** ((epoch >= epochs / 2) + (epoch >= 3 * epochs / 4))
    return 1.0


# ---------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on a terminal; on a pipe or file, a line at every quarter."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.next_line = 0.25

    def update(self, n: int, status: str) -> None:
        self.done += n
        share = self.done / max(self.total, 1)
        width = 24
        bar = "#" * int(width * share) + "-" * (width - int(width * share))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {status}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
        elif share >= self.next_line or self.done >= self.total:
            self.stream.write(line + "\n")
            self.next_line = math.floor(share * 4 + 1) / 4
        self.stream.flush()


# -------------------------------------------------------------------------------- evaluation


def localisation(salmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per image: share of saliency mass inside the box / the box's share of the image area.

    1.0 is what a flat map scores (no localisation); higher means mass concentrated on the box.
    Boxes are (x0, y0, x1, y1) in pixels with fractional edges; a pixel counts by the part of it
    the box covers.
    """
    height, width = salmap.shape[-2:]

    def coverage(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
        p = torch.arange(size, dtype=salmap.dtype, device=salmap.device)
        return (torch.minimum(p + 1, hi[:, None]) - torch.maximum(p, lo[:, None])).clamp(0, 1)

    boxes = boxes.to(salmap)
    rows = coverage(boxes[:, 1], boxes[:, 3], height)
    cols = coverage(boxes[:, 0], boxes[:, 2], width)
    cover = rows[:, :, None] * cols[:, None, :]
    mass = salmap[:, 0]
    inside = (mass * cover).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp_min(1e-12)
    area = cover.sum(dim=(1, 2)) / (height * width)
    return inside / area.clamp_min(1e-12)


@torch.no_grad()
def encode_split(
    model: nn.Module, method: Method, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """(packed codes, per-image localisation or None) of a split; `model` must be in eval mode.

    `method.encode` gives the deployed code's u and, for a method with attention, the map it was
    computed through (once, for both: Eq. 17), scored against the split's boxes where it has them.
    """
    codes, scores = [], []
    for batch in loader:
        x = batch[0].to(device)
        u, salmap = method.encode(model, x)
        if salmap is not None and len(batch) == 4:
            scores.append(localisation(salmap, batch[3].to(device)).cpu())
        codes.append(pack(binarize(u.cpu().numpy())))
    return np.concatenate(codes), (torch.cat(scores).numpy() if scores else None)


def evaluate_keeping_threads(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`dsah_rt.metrics.evaluate`, leaving torch's thread count as it was.

    numba's OpenMP threading layer sets the process's OpenMP thread count when its first parallel
    kernel runs, and torch shares that runtime: a run started with 1 thread would continue with
    all cores after the first evaluation, computing (slightly) different sums than a resumed run.
    """
    threads = torch.get_num_threads()
    try:
        return evaluate(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ trainer


def _labels_array(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.uint8) if labels.ndim == 2 else labels.astype(np.int64)


def _eval_loader(split, size: int, boxes: bool) -> DataLoader:
    # Its own generator: a loader without one draws a seed from torch's global RNG on every pass,
    # so an extra evaluation pass (as after a resume) would change the training's random stream.
    return DataLoader(
        TorchSplit(split, size, with_boxes=boxes), batch_size=EVAL_BATCH, shuffle=False, generator=torch.Generator()
    )


@contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# Options that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "eval_every"})


class Trainer:
    """One run (one code length) in `run_dir`. `fit()` trains up to `opts.epochs` and returns the metrics."""

    def __init__(
        self,
        opts: TrainOptions,
        run_dir: str | Path,
        data: RetrievalData | None = None,
        resume: bool = False,
        echo: Callable[[str], None] | None = None,
        progress: TextIO | None = None,
    ) -> None:
        self.opts = opts.resolved()
        self.run_dir = Path(run_dir)
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.progress_stream = progress
        self.device = resolve_device(self.opts.device)
        checkpoint_exists = (self.run_dir / R.CHECKPOINT).is_file()
        if resume and not checkpoint_exists:
            raise UserError(f"{self.run_dir}: nothing to resume (no {R.CHECKPOINT})")
        if not resume and checkpoint_exists:
            raise UserError(f"{self.run_dir}: already holds a run; pass --resume to continue it or choose another --out")
        state = R.load_checkpoint(self.run_dir) if resume else None
        if state is not None:
            self._check_resumable(state["config"]["training"])

        self.data = data if data is not None else load_dataset(
            self.opts.data, seed=self.opts.data_seed, **self.opts.data_options
        )
        self.method = get_method(self.opts.method)
        torch.manual_seed(self.opts.seed)
        if state is None:
            self.model = self.method.build(self.opts.backbone, self.opts.bits, self.opts.weights)
            self.weights_source = self.model.hashing.backbone.weights_source
        else:
            self.model = model_from_config(state["config"])
            self.model.load_state_dict(state["model"])
            self.weights_source = state["config"]["weights_source"]
        if self.opts.hash_backbone == "frozen":
            self.model.hashing.freeze_backbone()
        self.model.to(self.device)
        self.input_size = self.opts.input_size or self.model.hashing.backbone.input_size
        self.config = R.resolved_config(self.model, self.input_size, _jsonable(asdict(self.opts)), self.weights_source)
        self.phases = self.method.phases(self.model, self.opts, lambda module: _optimizer(self.opts, module))
        self.schedule = self.method.schedule(self.model, self.opts, self.phases)

        crop = self.opts.augment != "none"
        train_set = TorchSplit(self.data.train, self.input_size, augment=crop, flip=self.opts.augment == "crop+flip")
        if len(train_set) < 2:
            raise UserError(f"dataset {self.data.name}: the training split needs at least 2 images")
        self.generator = torch.Generator().manual_seed(self.opts.seed)
        self.train_loader = DataLoader(
            train_set, batch_size=min(self.opts.batch_size, len(train_set)), shuffle=True, drop_last=True,
            generator=self.generator, num_workers=self.opts.num_workers,
        )  # fmt: skip
        with_boxes = self.method.has_attention and self.data.query.boxes is not None
        self.query_loader = _eval_loader(self.data.query, self.input_size, with_boxes)
        self.train_eval_loader = _eval_loader(self.data.train, self.input_size, False)
        self.db_eval_loader = (
            self.train_eval_loader if self.data.database is self.data.train
            else _eval_loader(self.data.database, self.input_size, False)
        )

        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.train_codes: np.ndarray | None = None  # B at the last evaluation
        self.codes: tuple[np.ndarray, np.ndarray] | None = None  # (query, database) codes of that evaluation
        if state is not None:
            self._restore(state)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = _jsonable(asdict(self.opts))
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            k = changed[0]
            raise UserError(
                f"{self.run_dir}: cannot resume with a different {k} ({saved.get(k)!r} in the run, {now[k]!r} now); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        for phase in self.phases:
            phase.optimizer.load_state_dict(state["optimizers"][phase.name])
        R.restore_rng_states(state["rng"])
        self.generator.set_state(state["rng"]["loader"])
        self.epoch = state["epoch"]
        self.metrics = list(state["metrics"])
        codes = state.get("extra", {}).get("train_codes")
        self.train_codes = None if codes is None else codes.numpy()

    def fit(self) -> list[dict[str, Any]]:
        """Train from the current epoch to `opts.epochs`, checkpointing after each; return all metrics."""
        if self.epoch == 0 and not self.metrics:
            o = self.opts
            self.echo(f"{o.method} {o.bits} bits, backbone {o.backbone}: weights {self.weights_source}")
        elif self.epoch >= self.opts.epochs:
            self.echo(f"{self.run_dir}: already trained for {self.epoch} epochs (asked for {self.opts.epochs})")
        else:
            self.echo(f"{self.run_dir}: resuming after epoch {self.epoch} of {self.opts.epochs}")
        with _deterministic():
            while self.epoch < self.opts.epochs:
                self._epoch()
        return self.metrics

    def _epoch(self) -> None:
        epoch = self.epoch
        start = time.perf_counter()
        losses, diagnostics, images, train_seconds = {}, {}, 0, 0.0
        stage = self.schedule(epoch)
        for phase in stage.phases:
            lr = self.opts.lr * lr_factor(self.opts.schedule, epoch - stage.start, stage.length)
            for group in phase.optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            losses[phase.name], diagnostics[phase.name] = self.train_pass(
                phase, f"epoch {epoch + 1}/{self.opts.epochs} {phase.name}"
            )
            train_seconds += time.perf_counter() - tick
            images += len(self.train_loader) * self.train_loader.batch_size

        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": losses, "diagnostics": diagnostics, "lr": lr}
        evaluated = (epoch + 1) % self.opts.eval_every == 0 or epoch + 1 == self.opts.epochs
        if evaluated:
            entry.update(self._evaluate())
        entry.update({
            "images_per_s": images / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - start,
        })  # fmt: skip
        self.metrics.append(entry)
        self.epoch += 1
        self._save(evaluated)
        shown = f"epoch {epoch + 1}/{self.opts.epochs}: "
        if evaluated:
            shown += f"MAP {entry['map']:.4f}" + (f", localisation {entry['localisation']:.2f}" if "localisation" in entry else "")
        else:
            shown += f"loss {losses[next(reversed(losses))]['total']:.1f}"
        self.echo(shown + f", {entry['images_per_s']:.0f} images/s, ETA {_eta(self.metrics, self.opts.epochs)}")

    def _evaluate(self) -> dict[str, Any]:
        """MAP (and localisation) of the model as it is now; the codes are kept for `_save`.

        `train_bits_flipped` is the share of B's bits (the training set's codes, Eq. 17) that changed
        since the previous evaluation: the paper's Fig. 6 convergence in one number.
        """
        self.model.eval()
        query, loc = encode_split(self.model, self.method, self.query_loader, self.device)
        db, _ = encode_split(self.model, self.method, self.db_eval_loader, self.device)
        b = (db if self.data.database is self.data.train
             else encode_split(self.model, self.method, self.train_eval_loader, self.device)[0])  # fmt: skip
        flipped = None if self.train_codes is None else float(
            np.unpackbits(b ^ self.train_codes, axis=1, count=self.opts.bits).mean()
        )  # fmt: skip
        self.train_codes, self.codes = b, (query, db)
        ev = evaluate_keeping_threads(query, db, self.data.query.labels, self.data.database.labels, bits=self.opts.bits)
        out = {key: ev[key] for key in ("map", "map_tie_aware", "precision_at_radius")}
        out["train_bits_flipped"] = flipped
        if loc is not None:
            out["localisation"] = float(loc.mean())
        return out

    def train_pass(self, phase: Phase, label: str = "") -> tuple[dict[str, float], dict[str, float]]:
        """One pass over the training set for `phase`: the per-batch means of each loss term, and of
        each diagnostic (including `grad_norm`, the gradient's l2 norm before any clipping)."""
        phase.trains.train()
        sums: dict[str, float] = {}
        diag_sums: dict[str, float] = {}
        bar = Progress(len(self.train_loader) * self.train_loader.batch_size, label, self.progress_stream)
        tick, seen = time.perf_counter(), 0
        params = [p for group in phase.optimizer.param_groups for p in group["params"]]
        with frozen(phase.frozen):
            for batch in self.train_loader:
                x, labels = batch[0].to(self.device), batch[1].to(self.device)
                S = L.similarity(labels, labels)
                loss, logs, diagnostics = phase.objective(self.model, x, S)
                if not math.isfinite(logs["total"]):
                    kept = (f"the checkpoint of epoch {self.epoch} is kept in {self.run_dir}" if self.epoch
                            else "no epoch had finished, so nothing was written")
                    raise UserError(f"{label}: {_diverged(logs)}; {kept}")
                phase.optimizer.zero_grad(set_to_none=True)
                (loss / len(x)).backward()
                diagnostics["grad_norm"] = float(nn.utils.clip_grad_norm_(params, self.opts.clip_grad or math.inf))
                phase.optimizer.step()
                for into, values in ((sums, logs), (diag_sums, diagnostics)):
                    for key, value in values.items():
                        into[key] = into.get(key, 0.0) + value
                seen += len(x)
                rate = seen / (time.perf_counter() - tick)
                eta = (bar.total - seen) / max(rate, 1e-9)
                bar.update(len(x), f"loss {logs['total']:.1f} {rate:.0f} img/s, {eta:.0f} s left in this pass")
        batches = len(self.train_loader)
        return {k: v / batches for k, v in sums.items()}, {k: v / batches for k, v in diag_sums.items()}

    def _save(self, evaluated: bool) -> None:
        rng = {**R.capture_rng_states(), "loader": self.generator.get_state()}
        optimizers = {phase.name: phase.optimizer.state_dict() for phase in self.phases}
        extra = {} if self.train_codes is None else {"train_codes": torch.from_numpy(self.train_codes)}
        R.save_checkpoint(self.run_dir, self.model, optimizers, self.epoch, self.config, rng, self.metrics, extra=extra)
        if not evaluated:
            return
        described = {
            "run": str(self.run_dir), "method": self.opts.method, "bits": self.opts.bits, "epoch": self.epoch,
            "fingerprint": R.state_fingerprint(self.model.state_dict()),
        }  # fmt: skip
        query, db = self.codes
        write_codes(self.run_dir / "query_codes.npy", query, self.opts.bits, model=described)
        write_codes(self.run_dir / "db_codes.npy", db, self.opts.bits, model=described)
        for name, labels in (("query_labels.npy", self.data.query.labels),
                             ("db_labels.npy", self.data.database.labels)):
            arr = _labels_array(labels)
            atomic_write(self.run_dir / name, lambda fh, arr=arr: np.save(fh, arr, allow_pickle=False))


def _eta(metrics: list[dict[str, Any]], epochs: int) -> str:
    """Time left at the mean pace of the epochs so far, as 1h02m, 3m05s or 12s."""
    left = round(sum(m["epoch_seconds"] for m in metrics) / len(metrics) * (epochs - len(metrics)))
    hours, rest = divmod(left, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _diverged(logs: dict[str, float]) -> str:
    """Which logged terms went non-finite, e.g. 'the loss is not finite: sem_ori = inf, total = inf'."""
    bad = ", ".join(f"{k} = {v}" for k, v in logs.items() if not math.isfinite(v))
    return f"the loss is not finite: {bad}"


def _jsonable(obj: Any) -> Any:
    """Tuples as lists, so a config read back from JSON compares equal to a fresh one."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def train(
    opts: TrainOptions,
    run_dir: str | Path,
    data: RetrievalData | None = None,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    progress: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume) one run in `run_dir`; returns the per-epoch metrics also in metrics.json."""
    return Trainer(opts, run_dir, data=data, resume=resume, echo=echo, progress=progress).fit()
