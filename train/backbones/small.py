"""`small`: five conv stages and a pooled MLP, random init only, for tests and CPU runs."""

from __future__ import annotations

from torch import nn

from dsah_rt.train.backbones.base import (
    IMAGENET_MEAN, IMAGENET_STD, Backbone, WeightsError, load_state_dict_file, load_strict,
)
from dsah_rt.train.backbones.registry import register_backbone


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
            c3_index=3,  # three stride-2 stages: stride 8
            c3_channels=SMALL_WIDTHS[2],
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
        load_strict(net, load_state_dict_file(weights), weights)
        net.weights_source = weights
    return net
