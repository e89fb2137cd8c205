"""TorchRunner: the reference, the trained PyTorch model run eagerly through the same fused wrapper.

Needs the `train` extra (torch). Exported models are checked against it (`dsah-rt verify`).
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


def model_info(config: dict[str, Any], fingerprint: str, with_u: bool) -> ModelInfo:
    """The metadata an export of this run carries (also what the reference describes itself as)."""
    return ModelInfo(
        method=config["method"],
        backbone=config["backbone"],
        bits=int(config["bits"]),
        input_size=int(config["input_size"]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        fingerprint=fingerprint,
        with_u=with_u,
    )


class TorchRunner(Runner):
    """PyTorch eager on the CPU (or `device`); always has u, since it is the reference."""

    backend = "torch"

    def __init__(
        self, model: nn.Module, config: dict[str, Any], fingerprint: str, source: str, device: str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.config = config
        self.fused = FusedEncoder(model, config, with_u=True).to(self.device)
        super().__init__(model_info(config, fingerprint, with_u=True), source)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], bits: int | None = None, device: str = "cpu") -> TorchRunner:
        from dsah_rt.train.run import load_run, resolve_run_dir, run_fingerprint

        path = resolve_run_dir(run_dir, bits)
        model, config = load_run(path, device=device)
        return cls(model, config, run_fingerprint(path), str(Path(path)), device)

    def _activate(self) -> None:
        self.fused.eval()

    def _deactivate(self) -> None:
        pass

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
