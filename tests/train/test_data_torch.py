"""TorchSplit: resizing, labels, boxes that follow the pixels through augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dsah_rt.images import resize
from dsah_rt.train.data import Split, load_dataset
from dsah_rt.train.data.torch_dataset import TorchSplit


def white_box_split(n: int = 6, height: int = 40, width: int = 60) -> Split:
    """Black images with one white rectangle each, whose box is the split's box."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, height, width, 3), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        x0, y0 = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 12))
        x1, y1 = x0 + int(rng.integers(8, 16)), y0 + int(rng.integers(6, 12))
        images[i, y0:y1, x0:x1] = 255
        boxes[i] = (x0, y0, x1, y1)
    return Split(labels=np.arange(n, dtype=np.int64), images=images, boxes=boxes)


def inside_outside(image: torch.Tensor, box: torch.Tensor, margin: float = 1.5) -> tuple[float, float]:
    """Mean brightness well inside the box, and well outside it."""
    size = image.shape[-1]
    c = torch.arange(size) + 0.5
    x0, y0, x1, y1 = box.tolist()
    core = ((c[None, :] > x0 + margin) & (c[None, :] < x1 - margin)
            & (c[:, None] > y0 + margin) & (c[:, None] < y1 - margin))
    far = ~((c[None, :] > x0 - margin) & (c[None, :] < x1 + margin)
            & (c[:, None] > y0 - margin) & (c[:, None] < y1 + margin))
    grey = image.mean(0)
    return grey[core].mean().item(), grey[far].mean().item()


def test_items_are_resized_float_images_with_labels():
    data = load_dataset("digits")
    ds = TorchSplit(data.train, 32)
    image, label, index = ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert label.dtype == torch.int64 and label.ndim == 0 and label.item() == data.train.labels[5] and index == 5
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == data.train.labels[:4].tolist()


def test_whole_image_resized_without_crop():
    split = white_box_split(1)
    image, _, _ = TorchSplit(split, 30)[0]
    assert image.is_contiguous()
    exact = torch.from_numpy(resize(split.images[0], 30)).permute(2, 0, 1).float() / 255
    assert torch.equal(image, exact)  # the uint8 pixels encode gives the exported model
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(split.images[:1]).permute(0, 3, 1, 2).float() / 255, size=(30, 30),
        mode="bilinear", align_corners=False, antialias=True)[0]
    assert (image - smooth).abs().max() <= 1 / 255 + 1e-6  # the same filter, up to its rounding


def test_boxes_scaled_with_the_image():
    split = white_box_split()
    ds = TorchSplit(split, 90, with_boxes=True)
    for i in range(len(ds)):
        image, _, _, box = ds[i]
        assert torch.allclose(box, torch.tensor(split.boxes[i]) * torch.tensor([1.5, 2.25, 1.5, 2.25]))
        inside, outside = inside_outside(image, box)
        assert inside > 0.95 and outside < 0.05


def test_augmented_boxes_follow_the_pixels():
    torch.manual_seed(0)
    split = white_box_split()
    ds = TorchSplit(split, 64, augment=True, with_boxes=True)
    flipped_somewhere = False
    for _ in range(10):
        for i in range(len(ds)):
            image, _, _, box = ds[i]
            assert (box >= 0).all() and (box <= 64).all()
            inside, outside = inside_outside(image, box, margin=2.0)
            assert inside > 0.9 and outside < 0.05
            plain_x0 = split.boxes[i, 0] * 64 / 60
            flipped_somewhere |= abs(box[0].item() - plain_x0) > 8
    assert flipped_somewhere


def test_augment_without_flip_keeps_sides():
    torch.manual_seed(1)
    split = white_box_split()
    ds = TorchSplit(split, 60, augment=True, with_boxes=True, flip=False)
    for _ in range(10):
        for i in range(len(ds)):
            box = ds[i][3]
            # a crop keeps >= 85% of the side, so the box moves and grows only a little
            assert abs(box[0].item() - split.boxes[i, 0]) < 0.2 * 60


def test_multi_hot_labels_are_float(tmp_path: Path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((5, 7, 3), 100 * i, np.uint8)).save(paths[-1])
    split = Split(labels=np.array([[1, 0, 1], [0, 1, 0]], np.uint8), paths=paths)
    image, label, _ = TorchSplit(split, 16)[0]
    assert image.shape == (3, 16, 16) and label.dtype == torch.float32 and label.tolist() == [1, 0, 1]


def test_synthetic_boxes_through_torch():
    data = load_dataset("synthetic-fg", num_classes=3, train_per_class=4, query_per_class=1)
    image, label, index, box = TorchSplit(data.train, 128, with_boxes=True)[2]
    assert image.shape == (3, 128, 128)
    assert torch.allclose(box, torch.tensor(data.train.boxes[2]) * 2)
    with pytest.raises(ValueError):
        TorchSplit(load_dataset("digits").train, 32, with_boxes=True)
