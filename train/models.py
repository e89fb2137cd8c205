"""The two DSaH networks (paper sec. 3.1-3.2, 3.5) and the DPSH baseline, built by name.

Every model takes float images in [0, 1], NCHW RGB, and normalises inside (`Normalize`), so an
exported graph is fed raw pixels / 255 and the saliency image of Eq. 4 stays in pixel space.

  AttentionNet  FCN-16s (or FCN-8s): backbone -> fc6/fc7 as convolutions -> 1-channel saliency logits
  HashNet       backbone -> head (VGG fc6/fc7) -> Linear(head_features, bits) = u
  DSaH          attention + hashing, each with its own backbone: u, u' and the saliency map
  DPSH          HashNet alone, the paper's DPSH++ baseline on the same backbone

Code convention everywhere: bit = 1 iff u >= 0, i.e. +1 where u >= 0 else -1. `torch.sign`
is never used because sign(0) = 0 is not a code.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsah_rt.errors import UserError
from dsah_rt.train.backbones import Backbone, build_backbone
from dsah_rt.train.backbones.vgg import convolutionalize_vgg_head

Weights = str | os.PathLike | None


def bits_from_u(u: torch.Tensor) -> torch.Tensor:
    """Boolean codes: bit = 1 iff u >= 0."""
    return u >= 0


def pm1_from_u(u: torch.Tensor) -> torch.Tensor:
    """b of Eq. 12/17 in {-1, +1}: +1 where u >= 0 else -1 (so u == 0 gives +1, never 0)."""
    return (u >= 0).to(u.dtype) * 2 - 1


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers so they travel with checkpoints."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def minmax_normalize(s: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3 per image: (s - min) / (max - min) over all of an image's pixels, in [0, 1].

    A flat map (max - min <= eps) has no saliency to rank, so it maps to all ones: the saliency
    image is then the original image rather than a black one. The denominator is replaced
    before dividing, not after, so neither the value nor the gradient can be NaN.
    """
    flat = s.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (s.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (s.dim() - 1)))
    span = hi - lo
    ok = span > eps
    normalized = (s - lo) / torch.where(ok, span, torch.ones_like(span))
    return torch.where(ok, normalized, torch.ones_like(s))


def saliency_image(salmap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4: y = Salmap ⊙ x on the [0, 1] image (before normalisation, so masked pixels are black)."""
    return salmap * x


def _bilinear_kernel(factor: int) -> torch.Tensor:
    """The (2f x 2f) bilinear interpolation kernel FCN uses to initialise its deconvolutions."""
    size = 2 * factor
    center = factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor
    return torch.outer(ramp, ramp)


def _bilinear_upsampler(factor: int) -> nn.ConvTranspose2d:
    """A learnable 1-channel x`factor` upsampler that starts as bilinear interpolation.

    kernel 2f, stride f, padding f/2 gives exactly f * input size, aligned on pixel centres.
    """
    up = nn.ConvTranspose2d(1, 1, kernel_size=2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(_bilinear_kernel(factor).view(1, 1, 2 * factor, 2 * factor))
    return up


FCNS = ("16s", "8s")


class AttentionNet(nn.Module):
    """FCN saliency network (sec. 3.1): image in [0, 1] -> raw saliency logits (N, 1, H, W).

    It owns `backbone` and drops its pooled head: the FCN works on the feature maps. For VGG-16
    at the default width the head's fc6/fc7 become the 7x7/1x1 convolutions (FCN's
    convolutionalisation, so ImageNet weights carry over); otherwise `fc_channels`-wide
    convolutions (kernel 3) are freshly initialised, which keeps small configurations cheap.

    `fcn="16s"` (the paper's FCN-16s) scores strides 32 and 16; `"8s"` (FCN-8s, Long et al.) adds
    a stride-8 score. The finest grid sets how small a part the map can keep: the paper's VGG-16
    at 224 px scores a 14 x 14 grid, FCN-16s at 64 px a 4 x 4 one, on which a part of 4-8% of the
    image straddling a cell border costs ~25% of the image; FCN-8s at 64 px scores 8 x 8.
    """

    def __init__(self, backbone: Backbone, fc_channels: int | None = None, dropout: float = 0.5, fcn: str = "16s") -> None:
        super().__init__()
        if fcn not in FCNS:
            raise UserError(f"fcn must be one of {', '.join(FCNS)}, got {fcn!r}")
        self.fcn = fcn
        self.normalize = Normalize(backbone.mean, backbone.std)
        self.backbone = backbone
        head = backbone.drop_head()
        if backbone.name == "vgg16" and fc_channels in (None, 4096):
            self.fc = convolutionalize_vgg_head(head)
            fc_channels = 4096
        else:
            fc_channels = fc_channels or min(512, backbone.c5_channels)
            kernel = 7 if backbone.name == "vgg16" else 3
            self.fc = nn.Sequential(
                nn.Conv2d(backbone.c5_channels, fc_channels, kernel, padding=kernel // 2),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout),
                nn.Conv2d(fc_channels, fc_channels, 1),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout),
            )
        self.fc_channels = fc_channels
        self.score_c5 = nn.Conv2d(fc_channels, 1, 1)
        self.score_c4 = nn.Conv2d(backbone.c4_channels, 1, 1)
        # FCN zero-initialises each finer score so training starts from the coarser net's output.
        nn.init.zeros_(self.score_c4.weight)
        nn.init.zeros_(self.score_c4.bias)
        self.up2 = _bilinear_upsampler(2)
        if fcn == "16s":
            self.up16 = _bilinear_upsampler(16)
        else:
            self.score_c3 = nn.Conv2d(backbone.c3_channels, 1, 1)
            nn.init.zeros_(self.score_c3.weight)
            nn.init.zeros_(self.score_c3.bias)
            self.up2_c4 = _bilinear_upsampler(2)
            self.up8 = _bilinear_upsampler(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fcn == "16s":
            c4, c5 = self.backbone.forward_features(self.normalize(x))
        else:
            c3, c4, c5 = self.backbone.forward_pyramid(self.normalize(x))
        s = _fuse(self.up2(self.score_c5(self.fc(c5))), self.score_c4(c4))
        s = self.up16(s) if self.fcn == "16s" else self.up8(_fuse(self.up2_c4(s), self.score_c3(c3)))
        if s.shape[-2:] != x.shape[-2:]:
            s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return s


def _fuse(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """The upsampled coarser score plus the finer one (FCN's skip)."""
    if coarse.shape[-2:] != fine.shape[-2:]:
        # Odd sizes (input not a multiple of 32) floor or ceil differently per backbone.
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return coarse + fine


class HashNet(nn.Module):
    """Hashing network (sec. 3.2): backbone + head, with the classifier replaced by a hash layer."""

    def __init__(self, backbone: Backbone, bits: int) -> None:
        super().__init__()
        if bits <= 0:
            raise UserError(f"bits must be positive, got {bits}")
        self.normalize = Normalize(backbone.mean, backbone.std)
        self.backbone = backbone
        self.hash_layer = nn.Linear(backbone.head_features, bits)
        self.bits = bits
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_layer(self.backbone(self.normalize(x)))

    def freeze_backbone(self) -> HashNet:
        """Train only the hash layer: the backbone keeps its weights and its BatchNorm statistics.

        Sec. 4.3: "VGG-16 is not finetuned on each dataset". Eval mode is pinned (see `train`),
        so the saliency images that pass through it cannot shift statistics the original images
        are then encoded with.
        """
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> HashNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def _config(method: str, backbone: Backbone, bits: int, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "backbone": backbone.name,
        "bits": bits,
        "input_size": backbone.input_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "weights_source": backbone.weights_source,
        **extra,
    }


class DSaH(nn.Module):
    """The attention/hashing pair. Each network has its own backbone, as in the paper."""

    def __init__(self, attention: AttentionNet, hashing: HashNet, method: str = "dsah", identity_map: bool = False) -> None:
        super().__init__()
        self.attention = attention
        self.hashing = hashing
        self.method = method  # the registered training method, as config.json and the export record it
        # The control of an attention experiment: Salmap = 1, y = x, with everything else unchanged.
        self.identity_map = identity_map

    def saliency(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Salmap, y): the Eq. 3 map in [0, 1] (N, 1, H, W) and the Eq. 4 saliency image."""
        if self.identity_map:
            return torch.ones_like(x[:, :1]), x
        salmap = minmax_normalize(self.attention(x))
        return salmap, saliency_image(salmap, x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, u', Salmap): codes of the original and of the saliency image, and the map."""
        salmap, y = self.saliency(x)
        return self.hashing(x), self.hashing(y), salmap

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 15-17: the deployed code is sign(Hash(Attention(x))); this returns its u."""
        return self.hashing(self.saliency(x)[1])

    def config(self) -> dict[str, Any]:
        return _config(
            self.method,
            self.hashing.backbone,
            self.hashing.bits,
            fc_channels=self.attention.fc_channels,
            fcn=self.attention.fcn,
            identity_map=self.identity_map,
        )


class DPSH(nn.Module):
    """DPSH baseline (the paper's DPSH++): a HashNet alone. `hashing.*` keys match DSaH's."""

    def __init__(self, hashing: HashNet, method: str = "dpsh") -> None:
        super().__init__()
        self.hashing = hashing
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hashing(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hashing(x)

    def config(self) -> dict[str, Any]:
        return _config(self.method, self.hashing.backbone, self.hashing.bits)


def build_dsah(
    backbone: str, bits: int, weights: Weights = "imagenet", fc_channels: int | None = None, method: str = "dsah",
    identity_map: bool = False, fcn: str = "16s",
) -> DSaH:
    """DSaH on `backbone`: two independent backbone instances, both loaded with `weights`.

    The hashing network is built first, so that for one seed it starts from the same weights as
    `build_dpsh`'s (matched initialisation: a method comparison is then not an init lottery).
    """
    hashing = HashNet(build_backbone(backbone, weights), bits)
    attention = AttentionNet(build_backbone(backbone, weights), fc_channels=fc_channels, fcn=fcn)
    return DSaH(attention, hashing, method, identity_map)


def build_dpsh(backbone: str, bits: int, weights: Weights = "imagenet", method: str = "dpsh") -> DPSH:
    return DPSH(HashNet(build_backbone(backbone, weights), bits), method)
