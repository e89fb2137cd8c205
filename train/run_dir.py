"""A training run on disk: checkpoint, resolved config, per-epoch metrics, codes.

Layout of RUN_DIR for one code length:

    RUN_DIR/checkpoint.pt      model state, optimiser states, epoch, RNG states, metrics (atomic)
    RUN_DIR/config.json        the resolved config (below)
    RUN_DIR/metrics.json       a list, one object per finished epoch
    RUN_DIR/query_codes.npy    packed codes (+ .npy.json manifest), and
    RUN_DIR/db_codes.npy       their labels query_labels.npy / db_labels.npy

`dsah-rt train --bits 12 --bits 24 --out RUN_DIR` (several code lengths) writes one such run per
length in `RUN_DIR/bits-12/`, `RUN_DIR/bits-24/`, ... (`sub_run_dir`). `load_run` and
`resolve_run_dir` accept either a run itself or such a parent: with a parent, `bits` picks the
sub-run, and may be left out when there is only one.

The config is flat for the model, so `model_from_config(config)` rebuilds the architecture:
`method, backbone, bits, input_size, mean, std, weights_source` (+ `fc_channels` for DSaH) at the
top level; `training` holds the training options; `dsah_rt_version` and `format` identify it.
`input_size` is the size the model was trained at (not the backbone's nominal size), and
`weights_source` says which weights training started from, not the random init a rebuilt
model reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsah_rt import __version__
from dsah_rt.atomic import atomic_write, write_json
from dsah_rt.errors import UserError
from dsah_rt.train.methods import model_from_config

FORMAT = "dsah-rt-run/1"
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
SUB_RUN_PREFIX = "bits-"

PathLike = str | os.PathLike


def sub_run_dir(out: PathLike, bits: int, all_bits: list[int] | tuple[int, ...]) -> Path:
    """Where the run for `bits` goes: `out` itself for a single length, else `out/bits-K`."""
    out = Path(out)
    return out if len(all_bits) == 1 else out / f"{SUB_RUN_PREFIX}{bits}"


def _sub_runs(run_dir: Path) -> dict[int, Path]:
    runs = {}
    for child in run_dir.glob(f"{SUB_RUN_PREFIX}*"):
        suffix = child.name[len(SUB_RUN_PREFIX):]
        if suffix.isdigit() and (child / CHECKPOINT).is_file():
            runs[int(suffix)] = child
    return dict(sorted(runs.items()))


def resolve_run_dir(run_dir: PathLike, bits: int | None = None) -> Path:
    """The folder holding `checkpoint.pt`: `run_dir` itself, or its `bits-K` sub-run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    if (run_dir / CHECKPOINT).is_file():
        if bits is not None and _config_bits(run_dir) != bits:
            raise UserError(f"{run_dir}: holds a {_config_bits(run_dir)}-bit run, not {bits} bits")
        return run_dir
    subs = _sub_runs(run_dir)
    if not subs:
        raise UserError(f"{run_dir}: not a dsah-rt run (no {CHECKPOINT}, no {SUB_RUN_PREFIX}K sub-runs)")
    if bits is None:
        if len(subs) > 1:
            raise UserError(f"{run_dir}: holds runs for {', '.join(map(str, subs))} bits; choose one with bits")
        return next(iter(subs.values()))
    if bits not in subs:
        raise UserError(f"{run_dir}: no run for {bits} bits (found: {', '.join(map(str, subs))})")
    return subs[bits]


def _config_bits(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / CONFIG).read_text())["bits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable config is reported by whoever loads the run


def _np_state_to_safe(state: dict[str, Any]) -> dict[str, Any]:
    """numpy's legacy RNG state with its key array as a list, so `weights_only` loading accepts it."""
    return {**state, "state": {**state["state"], "key": state["state"]["key"].tolist()}}


def capture_rng_states() -> dict[str, Any]:
    """torch, numpy and Python global RNG states, in types a `weights_only` load can read."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_safe(np.random.get_state(legacy=False)),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    np_state = {**np_state, "state": {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(np_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def resolved_config(model: nn.Module, input_size: int, training: dict[str, Any], weights_source: str) -> dict[str, Any]:
    """The config.json of a run: model config (flat), training options, version."""
    return {
        "format": FORMAT,
        "dsah_rt_version": __version__,
        **model.config(),
        "input_size": int(input_size),
        "weights_source": weights_source,
        "training": training,
    }


def save_checkpoint(
    run_dir: PathLike,
    model: nn.Module,
    optimizer_states: dict[str, Any],
    epoch: int,
    config: dict[str, Any],
    rng_states: dict[str, Any],
    metrics: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint.pt, config.json and metrics.json of `run_dir`, each atomically.

    `epoch` is the number of finished epochs; `rng_states` is `capture_rng_states()` plus
    whatever else a resume needs (e.g. the data loader's generator); `extra` is any other
    trainer state (tensors and plain values). The checkpoint goes last: it is what `--resume`
    reads, so a crash mid-save resumes from the previous epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "dsah_rt_version": __version__,
        "model": model.state_dict(),
        "optimizers": optimizer_states,
        "epoch": int(epoch),
        "config": config,
        "rng": rng_states,
        "metrics": metrics,
        "extra": extra or {},
    }
    write_json(run_dir / CONFIG, config)
    write_json(run_dir / METRICS, metrics)
    return atomic_write(run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))


def load_checkpoint(run_dir: PathLike, bits: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict of a run (see `save_checkpoint`), checked to be a dsah-rt run."""
    path = resolve_run_dir(run_dir, bits) / CHECKPOINT
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not our file"
        raise UserError(f"{path}: not a readable dsah-rt checkpoint ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a dsah-rt run checkpoint (format {FORMAT} expected)")
    if bits is not None and state["config"]["bits"] != bits:
        raise UserError(f"{path.parent}: holds a {state['config']['bits']}-bit run, not {bits} bits")
    return state


def load_run(
    run_dir: PathLike, device: str | torch.device = "cpu", bits: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, config dict) of a finished or interrupted run.

    The model is rebuilt from the config and its state dict loaded strictly. The config is the
    run's own, so `weights_source` names the weights training started from.
    """
    state = load_checkpoint(run_dir, bits, device)
    config = state["config"]
    model = model_from_config(config)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise UserError(f"{run_dir}: checkpoint does not fit its own config ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), config


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(run_dir: PathLike, bits: int | None = None) -> str:
    """sha256 of the checkpoint's model weights: equal for equal weights, however often re-saved."""
    return state_fingerprint(load_checkpoint(run_dir, bits)["model"])
