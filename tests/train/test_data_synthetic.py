"""synthetic-fg: determinism, balance, boxes, and a class signal that lives only in the box."""

import time

import numpy as np
import pytest

from dsah_rt.errors import DataError
from dsah_rt.train.data import load_dataset, save_as_imagefolder
from dsah_rt.train.data.synthetic_fg import class_glyphs, generate, render, sample_latents

SIZE = 48  # smaller than the default 64 to keep the tests fast; geometry scales with it


def small(**kw):
    options = dict(num_classes=5, image_size=SIZE, train_per_class=8, query_per_class=4)
    return load_dataset("synthetic-fg", **{**options, **kw})


def test_deterministic_by_seed():
    a, b, c = small(seed=7), small(seed=7), small(seed=8)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.query.boxes, b.query.boxes)
    assert not np.array_equal(a.train.images, c.train.images)


def test_splits_use_separate_streams():
    a, b = small(), small(train_per_class=3)
    assert np.array_equal(a.query.images, b.query.images)


def test_balanced_classes_and_protocol():
    data = small(database_per_class=6)
    assert data.num_classes == 5 and not data.multilabel and len(data.class_names) == 5
    for split, n in ((data.train, 8), (data.query, 4), (data.database, 6)):
        assert np.bincount(split.labels, minlength=5).tolist() == [n] * 5
        assert split.images.shape == (5 * n, SIZE, SIZE, 3) and split.images.dtype == np.uint8


def test_database_defaults_to_train():
    data = small()
    assert data.database is data.train


def test_boxes_inside_image_and_small():
    data = small(image_size=64, train_per_class=40)
    boxes = data.train.boxes
    assert boxes.shape == (200, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64**2
    assert area.min() >= 0.03 and area.max() <= 0.08


def test_glyphs_distinct_symmetric_and_equally_heavy():
    glyphs = class_glyphs(12).reshape(12, 3, 3)
    assert len({g.tobytes() for g in glyphs}) == 12
    assert np.array_equal(glyphs, glyphs[:, :, ::-1])  # a left-right flip keeps the class
    assert set(glyphs.sum(axis=(1, 2))) == {5}
    assert len({g.tobytes() for g in class_glyphs(63)}) == 63
    with pytest.raises(DataError, match="num_classes"):
        class_glyphs(64)


def _inside(boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S): whether each pixel's centre lies in its image's box."""
    c = np.arange(size) + 0.5
    x0, y0, x1, y1 = (boxes[:, k, None, None] for k in range(4))
    return (c[None, None, :] >= x0) & (c[None, None, :] < x1) & (c[None, :, None] >= y0) & (c[None, :, None] < y1)


@pytest.mark.parametrize("decoys", [0, 2])
def test_class_changes_only_pixels_inside_the_box(decoys):
    n, classes = 64, 10
    glyphs = class_glyphs(classes)
    latents = sample_latents(np.random.default_rng(3), n, SIZE, classes, decoys)
    a = np.arange(n) % classes
    b = (a + 1 + np.arange(n) % (classes - 1)) % classes  # always a different class
    diff = (render(latents, a, glyphs) != render(latents, b, glyphs)).any(axis=-1)
    assert not (diff & ~_inside(latents.part_boxes(), SIZE)).any()
    assert diff.reshape(n, -1).any(axis=1).all()  # and the class is visible in every image


def _box_features(images: np.ndarray, boxes: np.ndarray, cells: int = 12) -> np.ndarray:
    """Each box resampled to cells x cells grey values, standardised per image."""
    grey = images.astype(np.float32).mean(axis=-1)
    t = (np.arange(cells) + 0.5) / cells
    xs = (boxes[:, 0, None] + t * (boxes[:, 2] - boxes[:, 0])[:, None]).astype(int)
    ys = (boxes[:, 1, None] + t * (boxes[:, 3] - boxes[:, 1])[:, None]).astype(int)
    feats = grey[np.arange(len(grey))[:, None, None], ys[:, :, None], xs[:, None, :]].reshape(len(grey), -1)
    return (feats - feats.mean(1, keepdims=True)) / (feats.std(1, keepdims=True) + 1e-6)


def _outside_features(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    outside = ~_inside(boxes, images.shape[1])
    return (images.astype(np.float32) * outside[..., None]).reshape(len(images), -1)


def _nearest_class_mean(train_x, train_y, test_x, test_y) -> float:
    means = np.stack([train_x[train_y == c].mean(0) for c in np.unique(train_y)])
    dist = ((test_x[:, None, :] - means[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == test_y).mean())


def test_class_is_learnable_inside_the_box_and_at_chance_outside():
    classes, glyphs = 10, class_glyphs(10)
    train = generate(np.random.default_rng(0), np.tile(np.arange(classes), 30), SIZE, glyphs, decoys=1)
    test = generate(np.random.default_rng(1), np.tile(np.arange(classes), 30), SIZE, glyphs, decoys=1)
    inside = _nearest_class_mean(_box_features(train.images, train.boxes), train.labels,
                                 _box_features(test.images, test.boxes), test.labels)
    outside = _nearest_class_mean(_outside_features(train.images, train.boxes), train.labels,
                                  _outside_features(test.images, test.boxes), test.labels)
    # chance is 0.1; with 300 test images its standard deviation is about 0.017
    assert inside > 0.8 and outside < 0.18, (inside, outside)


def test_default_set_generates_fast():
    start = time.perf_counter()
    data = load_dataset("synthetic-fg")
    elapsed = time.perf_counter() - start
    assert data.train.images.shape == (1000, 64, 64, 3) and len(data.query) == 300
    assert elapsed < 10, elapsed  # ~1.3 s on two cores; generous for loaded CI machines


def test_option_errors():
    with pytest.raises(DataError, match="image_size"):
        small(image_size=16)
    with pytest.raises(DataError, match="train_per_class"):
        small(train_per_class=0)


def test_save_as_imagefolder_round_trip(tmp_path):
    data = small(num_classes=3, train_per_class=2, query_per_class=1, image_size=32)
    save_as_imagefolder(data, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["database", "query", "train"]
    back = load_dataset(tmp_path)
    assert back.name == "imagefolder" and back.class_names == data.class_names
    for k in ("train", "query", "database"):
        ours, theirs = getattr(data, k), getattr(back, k)
        order = np.argsort(ours.labels, kind="stable")  # the folders group images by class
        assert np.array_equal(theirs.labels, ours.labels[order])
        assert all(np.array_equal(theirs.image(i), ours.image(j)) for i, j in enumerate(order))
