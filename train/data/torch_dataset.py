"""A Split as a PyTorch Dataset, resized to the model's input."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dsah_rt.images import resize

from .core import Split

# Augmentation keeps at least this fraction of each image side: enough to jitter position
# and scale, little enough that a small part is rarely cut.
MIN_CROP = 0.85


class TorchSplit(Dataset):
    """Items `(image, label, index)`, or `(image, label, index, box)` with `with_boxes`.

    `image` is a float 3 x size x size tensor in [0, 1]: `dsah_rt.images.resize` of the whole
    image, then / 255, so training sees exactly the uint8 pixels an exported model is given by
    `encode` (torch's antialiased float resize would differ from them by up to one level per
    pixel: rounding, and Pillow's fixed-point filter weights). `label` is an int64 class id, or a
    float32 multi-hot vector. `box` is the split's (x0, y0, x1, y1) part box in the output's pixels.
    `augment` takes a random crop of at least MIN_CROP of each side (inside it, the whole box
    where one is known) and, if `flip`, flips half the images left-right (label-safe for
    synthetic-fg, whose glyphs are symmetric; turn it off for digits and other writing).
    """

    def __init__(
        self, split: Split, size: int, augment: bool = False, with_boxes: bool = False, flip: bool = True
    ) -> None:
        if with_boxes and split.boxes is None:
            raise ValueError("with_boxes needs a split that has boxes")
        self.split, self.size, self.augment, self.with_boxes = split, size, augment, with_boxes
        self.flip = flip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.split.image(i)
        height, width = image.shape[:2]
        box = None if self.split.boxes is None else torch.as_tensor(self.split.boxes[i], dtype=torch.float32)
        x0, y0, cw, ch = 0, 0, width, height
        if self.augment:
            # torch's generator, not numpy's: DataLoader workers get distinct torch seeds.
            side = MIN_CROP + (1 - MIN_CROP) * torch.rand(()).item()
            cw, ch = max(1, round(width * side)), max(1, round(height * side))
            x0 = _offset(width, cw, None if box is None else (box[0].item(), box[2].item()))
            y0 = _offset(height, ch, None if box is None else (box[1].item(), box[3].item()))
            image = image[y0 : y0 + ch, x0 : x0 + cw]
        out = torch.from_numpy(resize(image, self.size)).permute(2, 0, 1).float().div_(255).contiguous()
        flip = self.augment and self.flip and torch.rand(()).item() < 0.5
        if flip:
            out = out.flip(-1)
        label = torch.as_tensor(self.split.labels[i])
        label = label.float() if label.ndim else label.long()
        if not self.with_boxes:
            return out, label, i
        box = box - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        box = torch.minimum(box.clamp(min=0), torch.tensor([cw, ch, cw, ch], dtype=torch.float32))
        box = box * torch.tensor([self.size / cw, self.size / ch] * 2)
        if flip:
            box = torch.stack([self.size - box[2], box[1], self.size - box[0], box[3]])
        return out, label, i, box


def _offset(full: int, crop: int, keep: tuple[float, float] | None) -> int:
    """A random crop start in [0, full - crop], chosen so the span `keep` stays inside when it fits."""
    low, high = 0, full - crop
    if keep is not None and keep[1] - keep[0] <= crop:
        low, high = max(low, int(np.ceil(keep[1])) - crop), min(high, int(keep[0]))
        low, high = min(low, high), max(low, high)
    return low + int(torch.randint(0, high - low + 1, ()).item())
