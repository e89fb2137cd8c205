"""The deployed encoder as one module: uint8 images in, packed codes (and optionally u) out.

Paper sec. 3.5: b = sign(Hash(Attention(x))). Everything between the raw pixels and the packed
bytes lives in this graph, so a runtime needs no preprocessing beyond decode + resize and no
postprocessing at all:

  uint8 NCHW -> float / 255 -> model.encode (normalise, attention, min-max, multiply, hash) = u
  -> bit = (u >= 0) -> pad to a multiple of 8 -> bytes = sum(bit * [128, 64, ..., 1]) -> uint8

Packing is arithmetic (multiply + reduce-sum) because TensorRT has no BitShift or BitwiseOr, and
the sums are integers below 256, exact in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsah_rt.codes import nbytes_for
from dsah_rt.errors import UserError
from dsah_rt.train.models import Normalize

INPUT_NAME = "images"
CODES_NAME = "codes"
U_NAME = "u"


class FusedEncoder(nn.Module):
    """Wrap a DSaH (or DPSH) model: forward(uint8 [N, 3, S, S]) -> codes uint8 [N, ceil(k/8)] (, u).

    `config` is the run's config (`load_run`): its `input_size` is the size the model was trained
    at, which can differ from the backbone's nominal size that `model.config()` reports.
    """

    def __init__(self, model: nn.Module, config: dict[str, Any] | None = None, with_u: bool = False) -> None:
        super().__init__()
        config = config or model.config()
        self.model = model.eval()
        self.bits: int = int(config["bits"])
        self.input_size: int = int(config["input_size"])
        self.with_u = with_u
        self._check_normalisation(config)
        weights = 2.0 ** torch.arange(7, -1, -1, dtype=torch.float32)  # MSB first: 128 ... 1
        self.register_buffer("byte_weights", weights, persistent=False)

    def _check_normalisation(self, config: dict[str, Any]) -> None:
        """The graph normalises with the model's buffers; they must be what the config promises."""
        for norm in (m for m in self.model.modules() if isinstance(m, Normalize)):
            for name in ("mean", "std"):
                have = getattr(norm, name).flatten().tolist()
                if any(abs(a - b) > 1e-6 for a, b in zip(have, config[name])):
                    raise UserError(f"model normalisation {name}={have} differs from its config {config[name]}")

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        u = self.model.encode(images.to(torch.float32) / 255.0)
        bits = (u >= 0).to(torch.float32)
        nbytes = nbytes_for(self.bits)
        if 8 * nbytes != self.bits:
            bits = F.pad(bits, (0, 8 * nbytes - self.bits))
        codes = (bits.reshape(-1, nbytes, 8) * self.byte_weights).sum(dim=-1).to(torch.uint8)
        return (codes, u) if self.with_u else codes
