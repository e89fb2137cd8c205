"""The shared pieces: Split, image decoding, per-class protocol sampling."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsah_rt.errors import DataError
from dsah_rt.train.data import Split, read_image
from dsah_rt.train.data.protocol import OFFICIAL, Sampled, apply_protocol, resolve_protocol, sample_indices


def test_split_holds_exactly_one_of_images_and_paths():
    with pytest.raises(ValueError):
        Split(labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError):
        Split(labels=np.zeros(2, np.int64), images=np.zeros((2, 4, 4, 3), np.uint8), paths=[Path("a"), Path("b")])
    with pytest.raises(ValueError):
        Split(labels=np.zeros(2, np.int64), images=np.zeros((3, 4, 4, 3), np.uint8))


def test_subset_keeps_rows_aligned():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    split = Split(labels=np.arange(5, dtype=np.int64), images=images, boxes=np.arange(20.0).reshape(5, 4))
    sub = split.subset(np.array([3, 1]))
    assert sub.labels.tolist() == [3, 1]
    assert sub.image(0)[0, 0, 0] == 3 and sub.image(1)[0, 0, 0] == 1
    assert sub.boxes[:, 0].tolist() == [12.0, 4.0]


@pytest.mark.parametrize(
    "protocol, sizes",
    [
        # CIFAR-10's real arithmetic: 10 classes x 6000 images.
        (Sampled(100, 500, train_in_database=False), (5000, 1000, 54000)),
        (Sampled(100, 500, train_in_database=True), (5000, 1000, 59000)),
    ],
)
def test_cifar_protocol_arithmetic_on_full_size_labels(protocol, sizes):
    labels = np.repeat(np.arange(10), 6000)
    train, query, database = sample_indices(labels, protocol, seed=0, where="cifar")
    assert (len(train), len(query), len(database)) == sizes
    assert np.bincount(labels[query]).tolist() == [100] * 10
    assert np.bincount(labels[train]).tolist() == [500] * 10
    assert not np.intersect1d(query, train).size and not np.intersect1d(query, database).size
    if protocol.train_in_database:
        assert np.union1d(query, database).size == 60000 and np.isin(train, database).all()
    else:
        assert not np.intersect1d(train, database).size
        assert np.union1d(np.union1d(query, train), database).size == 60000


def test_mnist_protocol_arithmetic():
    labels = np.repeat(np.arange(10), 7000)
    sizes = [
        tuple(map(len, sample_indices(labels, Sampled(100, 500, in_db), seed=3, where="mnist")))
        for in_db in (False, True)
    ]
    assert sizes == [(5000, 1000, 64000), (5000, 1000, 69000)]


def test_sampling_is_seeded():
    labels = np.repeat(np.arange(4), 30)
    protocol = Sampled(5, 10, False)
    a = sample_indices(labels, protocol, seed=1, where="x")
    b = sample_indices(labels, protocol, seed=1, where="x")
    c = sample_indices(labels, protocol, seed=2, where="x")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_query_does_not_depend_on_train_size():
    labels = np.repeat(np.arange(4), 30)
    q1 = sample_indices(labels, Sampled(5, 10, False), seed=0, where="x")[1]
    q2 = sample_indices(labels, Sampled(5, 20, False), seed=0, where="x")[1]
    assert np.array_equal(q1, q2)


def test_train_takes_the_rest_when_unsized():
    labels = np.repeat(np.arange(3), 8)
    train, query, database = sample_indices(labels, Sampled(2, None, True), seed=0, where="x")
    assert len(query) == 6 and len(train) == 18 and np.array_equal(train, database)
    with pytest.raises(DataError, match="database would be empty"):
        sample_indices(labels, Sampled(2, None, False), seed=0, where="x")


def test_too_small_class_names_the_class():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match=r"where: class tulip has 3 images"):
        sample_indices(labels, Sampled(2, 2, False), seed=0, where="where", class_names=["rose", "tulip"])


def test_bad_counts_and_multilabel_rejected():
    with pytest.raises(DataError, match="query_per_class"):
        sample_indices(np.zeros(5, np.int64), Sampled(0, 1, False), 0, "x")
    with pytest.raises(DataError, match="multi-hot"):
        sample_indices(np.zeros((5, 2), np.uint8), Sampled(1, 1, False), 0, "x")


def test_resolve_protocol_overrides_and_official():
    table = {"a": Sampled(100, 500, True), "b": OFFICIAL}
    assert resolve_protocol("a", table, "x", query_per_class=2) == Sampled(2, 500, True)
    assert resolve_protocol("b", table, "x") == OFFICIAL
    with pytest.raises(DataError, match="unknown protocol 'c'"):
        resolve_protocol("c", table, "x")
    with pytest.raises(DataError, match="official split"):
        resolve_protocol("b", table, "x", train_per_class=3)


def test_official_protocol_keeps_order_and_shares_train():
    pool = Split(labels=np.arange(6, dtype=np.int64) % 2, images=np.zeros((6, 2, 2, 3), np.uint8))
    train, query, database = apply_protocol(pool, OFFICIAL, 0, "x", official_train=4)
    assert len(train) == 4 and len(query) == 2 and database is train


def _png(path: Path, array: np.ndarray, **save) -> Path:
    Image.fromarray(array).save(path, **save)
    return path


def test_read_image_converts_to_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_png(tmp_path / "g.png", grey))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)


def test_read_image_applies_exif_orientation(tmp_path):
    img = Image.fromarray(np.zeros((2, 4, 3), np.uint8))  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (4, 2, 3)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_image_is_one_line_data_error(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_jpeg_is_data_error(tmp_path):
    path = _png(tmp_path / "t.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="t.jpg: cannot read image"):
        read_image(path)
