"""What both DSaH networks need from a CNN, and how a backbone's weights are read.

The attention network (FCN-16s) needs two feature maps, c4 at stride 16 (VGG pool4) and c5 at
stride 32 (VGG pool5), and as FCN-8s a third, c3 at stride 8 (VGG pool3); the hashing network
needs a feature vector (VGG fc7) under which it puts its hash layer. A `Backbone` exposes exactly
those: `forward_features(x) -> (c4, c5)`, `forward_pyramid(x) -> (c3, c4, c5)` and
`head(c5) -> (N, head_features)`, plus the input size and normalisation its weights expect.

Backbones take *normalised* images; `dsah_rt.train.models.Normalize` applies `mean`/`std`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsah_rt.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(UserError):
    """Requested backbone weights that cannot be found or do not fit the architecture."""


class Backbone(nn.Module):
    """A CNN cut into the pieces DSaH uses.

    `to_c4` maps a normalised image to the stride-16 map, `to_c5` maps that to the stride-32 map
    and `head` maps the stride-32 map to a feature vector for the hash layer. `to_c4[:c3_index]`
    ends at the stride-8 map: slicing the one Sequential keeps every parameter's name, so weights
    and checkpoints saved before FCN-8s existed still load.
    """

    def __init__(
        self,
        *,
        name: str,
        to_c4: nn.Sequential,
        to_c5: nn.Module,
        head: nn.Module,
        c3_index: int,
        c3_channels: int,
        c4_channels: int,
        c5_channels: int,
        head_features: int,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.to_c4 = to_c4
        self.to_c5 = to_c5
        self.head: nn.Module | None = head
        self.c3_index = c3_index
        self.c3_channels = c3_channels
        self.c4_channels = c4_channels
        self.c5_channels = c5_channels
        self.head_features = head_features
        self.input_size = input_size
        self.mean = mean
        self.std = std
        self.weights_source = weights_source

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.to_c4(x)
        return c4, self.to_c5(c4)

    def forward_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c3, c4, c5) at strides 8, 16 and 32, for FCN-8s."""
        c3 = self.to_c4[: self.c3_index](x)
        c4 = self.to_c4[self.c3_index :](c3)
        return c3, c4, self.to_c5(c4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError(f"backbone {self.name!r} had its head dropped; use forward_features")
        return self.head(self.forward_features(x)[1])

    def drop_head(self) -> nn.Module:
        """Remove and return the head, for a network (the FCN) that uses only the feature maps.

        Keeping an unused head would leave parameters that never get a gradient but still take
        weight decay and memory.
        """
        if self.head is None:
            raise RuntimeError(f"backbone {self.name!r} has no head left to drop")
        head, self.head, self.head_features = self.head, None, 0
        return head



def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict saved in `path`, or a `WeightsError` saying why it cannot be read."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format failure is the user's file, not our bug
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every parameter of `module` from `state` (read from `source`), none missing or left over."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {source} do not fit {type(module).__name__}: {exc}") from exc

