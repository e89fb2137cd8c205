"""Evaluation during training: codes of a split through the deployed function, MAP, localisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dsah_rt.codes import binarize, pack
from dsah_rt.metrics import Evaluation, evaluate
from dsah_rt.train.data import Split
from dsah_rt.train.data.torch_dataset import TorchSplit
from dsah_rt.train.methods import Method

EVAL_BATCH = 128


def localisation(salmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per image: share of saliency mass inside the box / the box's share of the image area.

    1.0 is what a flat map scores (no localisation); higher means mass concentrated on the box.
    Boxes are (x0, y0, x1, y1) in pixels with fractional edges; a pixel counts by the part of it
    the box covers.
    """
    height, width = salmap.shape[-2:]

    def coverage(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
        p = torch.arange(size, dtype=salmap.dtype, device=salmap.device)
        return (torch.minimum(p + 1, hi[:, None]) - torch.maximum(p, lo[:, None])).clamp(0, 1)

    boxes = boxes.to(salmap)
    rows = coverage(boxes[:, 1], boxes[:, 3], height)
    cols = coverage(boxes[:, 0], boxes[:, 2], width)
    cover = rows[:, :, None] * cols[:, None, :]
    mass = salmap[:, 0]
    inside = (mass * cover).sum(dim=(1, 2)) / mass.sum(dim=(1, 2)).clamp_min(1e-12)
    area = cover.sum(dim=(1, 2)) / (height * width)
    return inside / area.clamp_min(1e-12)


@torch.no_grad()
def encode_split(
    model: nn.Module, method: Method, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """(packed codes, per-image localisation or None) of a split; `model` must be in eval mode.

    `method.encode` gives the deployed code's u and, for a method with attention, the map it was
    computed through (once, for both: Eq. 17), scored against the split's boxes where it has them.
    """
    codes, scores = [], []
    for batch in loader:
        x = batch[0].to(device)
        u, salmap = method.encode(model, x)
        if salmap is not None and len(batch) == 4:
            scores.append(localisation(salmap, batch[3].to(device)).cpu())
        codes.append(pack(binarize(u.cpu().numpy())))
    return np.concatenate(codes), (torch.cat(scores).numpy() if scores else None)


def evaluate_keeping_threads(*args: Any, **kwargs: Any) -> Evaluation:
    """`dsah_rt.metrics.evaluate`, leaving torch's thread count as it was.

    numba's OpenMP threading layer sets the process's OpenMP thread count when its first parallel
    kernel runs, and torch shares that runtime: a run started with 1 thread would continue with
    all cores after the first evaluation, computing (slightly) different sums than a resumed run.
    """
    threads = torch.get_num_threads()
    try:
        return evaluate(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def eval_loader(split: Split, size: int, boxes: bool) -> DataLoader:
    """The split in order at `size` px, with its part boxes when `boxes`, in evaluation batches."""
    # Its own generator: a loader without one draws a seed from torch's global RNG on every pass,
    # so an extra evaluation pass (as after a resume) would change the training's random stream.
    return DataLoader(
        TorchSplit(split, size, with_boxes=boxes), batch_size=EVAL_BATCH, shuffle=False, generator=torch.Generator()
    )

