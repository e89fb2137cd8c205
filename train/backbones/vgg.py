"""VGG-16, the paper's backbone: torchvision's network cut at pool4, its fc6/fc7 as the head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsah_rt.train.backbones.base import (
    IMAGENET_MEAN, IMAGENET_STD, Backbone, WeightsError, load_state_dict_file, load_strict,
)
from dsah_rt.train.backbones.registry import register_backbone

VGG16_HUB_FILE = "vgg16-397923af.pth"


def vgg16_hub_path() -> Path:
    """Where torchvision keeps its VGG-16 ImageNet weights once downloaded (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_HUB_FILE


def convolutionalize_vgg_head(head: nn.Sequential, fc6_padding: int = 3) -> nn.Sequential:
    """FCN's trick: turn VGG's fc6/fc7 (Linear) into 7x7 and 1x1 convolutions with the same weights.

    fc6 sees the 7x7x512 pool5 window, so its weight reshapes exactly into a 7x7 kernel. FCN pads
    conv1_1 by 100 to keep fc6 valid on small inputs; padding fc6 itself by 3 keeps the stride-32
    map the same size as pool5 instead, which is simpler and works for any input size.
    """
    fc6, fc7 = (m for m in head if isinstance(m, nn.Linear))
    in_channels = fc6.in_features // 49
    conv6 = nn.Conv2d(in_channels, fc6.out_features, kernel_size=7, padding=fc6_padding)
    conv7 = nn.Conv2d(fc7.in_features, fc7.out_features, kernel_size=1)
    with torch.no_grad():
        conv6.weight.copy_(fc6.weight.view(fc6.out_features, in_channels, 7, 7))
        conv6.bias.copy_(fc6.bias)
        conv7.weight.copy_(fc7.weight.view(fc7.out_features, fc7.in_features, 1, 1))
        conv7.bias.copy_(fc7.bias)
    dropout = next(m for m in head if isinstance(m, nn.Dropout)).p
    return nn.Sequential(
        conv6, nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        conv7, nn.ReLU(inplace=True), nn.Dropout2d(dropout),
    )  # fmt: skip


@register_backbone("vgg16")
def _vgg16(weights: str | None) -> Backbone:
    from torchvision.models import vgg16

    if weights == "imagenet":
        path = vgg16_hub_path()
        if not path.is_file():
            raise WeightsError(
                f"VGG-16 ImageNet weights not found at {path} (torchvision's hub cache). "
                f"Place {VGG16_HUB_FILE} there (from torchvision.models.VGG16_Weights.IMAGENET1K_V1.url), "
                "pass weights=<path to a torchvision vgg16 state dict>, or weights='none' for random init."
            )
        weights_file, source = str(path), f"imagenet ({path})"
    else:
        weights_file, source = weights, weights or "none (random init)"
    # Read the file before building: a bad path fails at once, not after 138M parameters' init.
    state = None if weights_file is None else load_state_dict_file(weights_file)
    net = vgg16(weights=None)  # never let torchvision download; weights are loaded below
    if state is not None:
        load_strict(net, state, weights_file)
    pool4_end = 24  # features[23] is pool4: everything up to it is stride 16
    pool3_end = 17  # features[16] is pool3: stride 8
    return Backbone(
        name="vgg16",
        to_c4=net.features[:pool4_end],
        to_c5=net.features[pool4_end:],
        # fc6/fc7 with their ReLU+Dropout; fc8 (the 1000-way classifier) is what DSaH replaces.
        head=nn.Sequential(net.avgpool, nn.Flatten(1), *net.classifier[:-1]),
        c3_index=pool3_end,
        c3_channels=256,
        c4_channels=512,
        c5_channels=512,
        head_features=4096,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_source=source,
    )

