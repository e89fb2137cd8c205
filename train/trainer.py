"""Training: the loop over a method's phases (train/methods/), evaluation, checkpoints and resume.

An epoch runs the phases the method names (DSaH's Algorithm 1: attention, then hashing; its
warm-up, wait and refit; Eq. 18's joint pass; DPSH's one pass), each a pass over the training set
with its own optimiser, then evaluates every `eval_every` epochs: codes of the query and database
splits through the deployed function (`Method.encode`, Eq. 17 for DSaH), MAP, localisation where
boxes exist, and `train_bits_flipped`, the share of B's bits (the training set's codes) that
changed since the previous evaluation (the paper's Fig. 6 in one number). The options and why
their defaults are what they are: `dsah_rt.train.options`.

Loss scale: the objectives are sums over the N(N-1)/2 pairs of a batch, as the paper writes them,
and the weights lambda/alpha are calibrated against those sums. The trainer divides each total by
the batch size N before the backward pass: every ratio between terms stays the paper's and only
the step is rescaled, so learning rates are per image. Full batches only (`drop_last`): a short
last batch has fewer pairs per image, so a differently weighted loss.

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
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dsah_rt.atomic import atomic_write
from dsah_rt.codes import write_codes
from dsah_rt.errors import UserError
from dsah_rt.progress import ProgressBar, format_duration
from dsah_rt.train.data import RetrievalData, load_dataset
from dsah_rt.train.data.torch_dataset import TorchSplit
from dsah_rt.train.evaluation import encode_split, eval_loader, evaluate_keeping_threads
from dsah_rt.train.losses import similarity
from dsah_rt.train.methods import Phase, frozen, get_method, model_from_config
from dsah_rt.train.options import ADDED_OPTIONS, RESUMABLE_CHANGES, TrainOptions, resolve_device
from dsah_rt.train.run_dir import (
    CHECKPOINT, capture_rng_states, load_checkpoint, resolved_config, restore_rng_states, save_checkpoint,
    state_fingerprint,
)


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


def _labels_array(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.uint8) if labels.ndim == 2 else labels.astype(np.int64)


@contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


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
        checkpoint_exists = (self.run_dir / CHECKPOINT).is_file()
        if resume and not checkpoint_exists:
            raise UserError(f"{self.run_dir}: nothing to resume (no {CHECKPOINT})")
        if not resume and checkpoint_exists:
            raise UserError(f"{self.run_dir}: already holds a run; pass --resume to continue it or choose another --out")
        state = load_checkpoint(self.run_dir) if resume else None
        if state is not None:
            self._check_resumable(state["config"]["training"])

        self.data = data if data is not None else load_dataset(
            self.opts.data, seed=self.opts.data_seed, **self.opts.data_options
        )
        self.method = get_method(self.opts.method)
        torch.manual_seed(self.opts.seed)
        if state is None:
            self.model = self.method.build(self.opts.backbone, self.opts.bits, self.opts.weights,
                                           **self.method.architecture_from_options(self.opts))  # fmt: skip
            self.weights_source = self.model.hashing.backbone.weights_source
        else:
            self.model = model_from_config(state["config"])
            self.model.load_state_dict(state["model"])
            self.weights_source = state["config"]["weights_source"]
        if self.opts.hash_backbone == "frozen":
            self.model.hashing.freeze_backbone()
        self.model.to(self.device)
        self.input_size = self.opts.input_size or self.model.hashing.backbone.input_size
        self.config = resolved_config(self.model, self.input_size, _jsonable(asdict(self.opts)), self.weights_source)
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
        self.query_loader = eval_loader(self.data.query, self.input_size, with_boxes)
        self.train_eval_loader = eval_loader(self.data.train, self.input_size, False)
        self.db_eval_loader = (
            self.train_eval_loader if self.data.database is self.data.train
            else eval_loader(self.data.database, self.input_size, False)
        )

        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.train_codes: np.ndarray | None = None  # B at the last evaluation
        self.codes: tuple[np.ndarray, np.ndarray] | None = None  # (query, database) codes of that evaluation
        if state is not None:
            self._restore(state)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = _jsonable(asdict(self.opts))
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, ADDED_OPTIONS.get(k)) != now[k])
        if changed:
            k = changed[0]
            raise UserError(
                f"{self.run_dir}: cannot resume with a different {k} ({saved.get(k)!r} in the run, {now[k]!r} now); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        for phase in self.phases:
            phase.optimizer.load_state_dict(state["optimizers"][phase.name])
        restore_rng_states(state["rng"])
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
        for line in self.method.remarks(self.opts, self.metrics):
            self.echo(line)
        return self.metrics

    def _epoch(self) -> None:
        epoch = self.epoch
        start = time.perf_counter()
        losses, diagnostics, images, train_seconds = {}, {}, 0, 0.0
        stage = self.schedule(epoch, self.metrics)
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
        out = {key: getattr(ev, key) for key in ("map", "map_tie_aware", "precision_at_radius")}
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
        total, seen = len(self.train_loader) * self.train_loader.batch_size, 0
        params = [p for group in phase.optimizer.param_groups for p in group["params"]]
        with frozen(phase.frozen), ProgressBar(label, self.progress_stream) as bar:
            bar.update(seen, total)
            for batch in self.train_loader:
                x, labels = batch[0].to(self.device), batch[1].to(self.device)
                S = similarity(labels, labels)
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
                bar.update(seen, total, f"loss {logs['total']:.1f}")
        batches = len(self.train_loader)
        return {k: v / batches for k, v in sums.items()}, {k: v / batches for k, v in diag_sums.items()}

    def _save(self, evaluated: bool) -> None:
        rng = {**capture_rng_states(), "loader": self.generator.get_state()}
        optimizers = {phase.name: phase.optimizer.state_dict() for phase in self.phases}
        extra = {} if self.train_codes is None else {"train_codes": torch.from_numpy(self.train_codes)}
        save_checkpoint(self.run_dir, self.model, optimizers, self.epoch, self.config, rng, self.metrics, extra=extra)
        if not evaluated:
            return
        described = {
            "run": str(self.run_dir), "method": self.opts.method, "bits": self.opts.bits, "epoch": self.epoch,
            "fingerprint": state_fingerprint(self.model.state_dict()),
        }  # fmt: skip
        query, db = self.codes
        write_codes(self.run_dir / "query_codes.npy", query, self.opts.bits, model=described)
        write_codes(self.run_dir / "db_codes.npy", db, self.opts.bits, model=described)
        for name, labels in (("query_labels.npy", self.data.query.labels),
                             ("db_labels.npy", self.data.database.labels)):
            arr = _labels_array(labels)
            atomic_write(self.run_dir / name, lambda fh, arr=arr: np.save(fh, arr, allow_pickle=False))


def _eta(metrics: list[dict[str, Any]], epochs: int) -> str:
    """Time left at the mean pace of the epochs so far."""
    return format_duration(sum(m["epoch_seconds"] for m in metrics) / len(metrics) * (epochs - len(metrics)))


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
