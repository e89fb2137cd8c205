"""TorchRunner: the reference, the trained PyTorch model run eagerly through the same fused wrapper.

Needs the `train` extra (torch). Exported models are checked against it (`dsah-rt verify`). The
runtime core reaches it only through the registry's `torch` backend (`runner_for`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsah_rt.export.fused import FusedEncoder
from dsah_rt.runners.base import ModelInfo, Runner


class ModelFromRun:
    """A lazy loader, in Polygraphy's style: calling it reads a run's checkpoint, once.

    Returns (model, config, fingerprint); the fingerprint is taken from the loaded weights, which
    a strict state-dict load makes the checkpoint's own.
    """

    def __init__(self, run_dir: str | os.PathLike[str], bits: int | None = None, device: str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        self.bits = bits
        self.device = device

    def __call__(self) -> tuple[nn.Module, dict[str, Any], str]:
        from dsah_rt.train.run_dir import load_run, resolve_run_dir, state_fingerprint

        model, config = load_run(resolve_run_dir(self.run_dir, self.bits), device=self.device)
        return model, config, state_fingerprint(model.state_dict())


class TorchRunner(Runner):
    """PyTorch eager on the CPU (or the loader's device); always has u, since it is the reference."""

    backend = "torch"

    def __init__(self, loader: ModelFromRun) -> None:
        self.loader = loader
        self.device = torch.device(loader.device)
        self.config: dict[str, Any] = {}
        self.fused: FusedEncoder | None = None
        super().__init__(None, str(loader.run_dir))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], bits: int | None = None, device: str = "cpu") -> TorchRunner:
        return cls(ModelFromRun(run_dir, bits, device))

    def _activate(self) -> None:
        model, self.config, fingerprint = self.loader()
        self.fused = FusedEncoder(model, self.config, with_u=True).to(self.device).eval()
        self.info = ModelInfo.from_config(self.config, fingerprint, with_u=True)

    def _deactivate(self) -> None:
        self.fused = None

    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            codes, u = self.fused(torch.from_numpy(images).to(self.device))
        return codes.cpu().numpy(), (u.float().cpu().numpy() if with_u else None)

    def _describe(self) -> dict[str, Any]:
        return {
            "runtime": f"torch {torch.__version__}",
            "device": str(self.device),
            "precision": "fp32",
            "threads": torch.get_num_threads(),
        }


def runner_for(path: Path, threads: int | None = None, bits: int | None = None) -> TorchRunner:
    """The registry's factory for the `torch` backend (threads: torch keeps its own setting)."""
    return TorchRunner.from_run(path, bits=bits)
