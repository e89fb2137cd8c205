"""Each published format, on small fixtures written here in that exact format, and the registry."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dsah_rt.errors import DataError
from dsah_rt.train.data import DATASETS, load_dataset

RNG = np.random.default_rng(0)


def assert_one_line_naming(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def write_image(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> Path:
    """A tiny image whose pixels all equal `value`, so a test can tell which file was read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


# --- imagefolder -------------------------------------------------------------------------


def write_class_tree(root: Path, per_class: dict[str, int], ext: str = ".png") -> None:
    for c, (name, n) in enumerate(sorted(per_class.items())):
        for i in range(n):
            write_image(root / name / f"{i:03d}{ext}", 10 * c)


def test_imagefolder_sampled_protocol(tmp_path):
    write_class_tree(tmp_path, {"cat": 12, "dog": 15, "emu": 11})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"junk")
    data = load_dataset(tmp_path, query_per_class=2, train_per_class=5, train_in_database=False)
    assert data.name == "imagefolder" and data.class_names == ["cat", "dog", "emu"]
    assert [s.path for s in data.skipped] == ["cat/.hidden.png", "cat/notes.txt"]
    assert (len(data.query), len(data.train), len(data.database)) == (6, 15, 38 - 21)
    assert np.bincount(data.query.labels).tolist() == [2, 2, 2]
    everything = data.query.paths + data.train.paths + data.database.paths
    assert len(set(everything)) == 38 and all(p.suffix == ".png" for p in everything)
    # pixels were written as 10 * class id
    assert all(data.train.image(i)[0, 0, 0] == 10 * data.train.labels[i] for i in range(len(data.train)))


def test_imagefolder_defaults_and_seed(tmp_path):
    write_class_tree(tmp_path, {"a": 14, "b": 13}, ext=".jpg")
    data = load_dataset(str(tmp_path))
    # 10 query per class; train = database = the rest
    assert len(data.query) == 20 and len(data.train) == 7 and data.database is data.train
    again, other = load_dataset(str(tmp_path)), load_dataset(str(tmp_path), seed=5)
    assert again.query.paths == data.query.paths and other.query.paths != data.query.paths


def test_imagefolder_split_folders(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 3, "b": 2})
    write_class_tree(tmp_path / "test", {"a": 1, "c": 2})
    data = load_dataset(tmp_path)
    assert data.class_names == ["a", "b", "c"] and data.num_classes == 3
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1] and data.query.labels.tolist() == [0, 2, 2]
    assert data.database is data.train
    write_class_tree(tmp_path / "database", {"b": 4})
    assert load_dataset(tmp_path).database.labels.tolist() == [1] * 4
    with pytest.raises(DataError, match="cannot apply"):
        load_dataset(tmp_path, query_per_class=3)


def test_imagefolder_picks_images_by_content_like_encode(tmp_path):
    from dsah_rt.images import find_images

    write_class_tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "002.png").write_bytes(b"\x89PNG broken")  # an image's name, not its bytes
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    # found in a subfolder, and by content: a PNG with no extension
    write_image(tmp_path / "a" / "deeper" / "x.png", 0).rename(tmp_path / "a" / "deeper" / "really_png")
    data = load_dataset(tmp_path, query_per_class=1)
    paths = data.query.paths + data.train.paths
    assert tmp_path / "a" / "deeper" / "really_png" in paths and tmp_path / "b" / "002.png" not in paths
    assert [(s.path, s.reason.split(" (")[0]) for s in data.skipped] == [
        ("a/notes.txt", "not an image"), ("b/002.png", "not an image")]
    for name in ("a", "b"):  # the same files encode would take from each class folder
        found = find_images(tmp_path / name)
        assert sorted(tmp_path / name / rel for rel in found.files) == sorted(
            p for p in paths if p.is_relative_to(tmp_path / name))


def test_imagefolder_split_folders_report_skips_under_their_folder(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 2})
    write_class_tree(tmp_path / "query", {"a": 1})
    (tmp_path / "query" / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert [s.path for s in load_dataset(tmp_path).skipped] == ["query/a/.DS_Store"]


def _truncated(path: Path) -> Path:
    """A PNG whose header is whole (so it opens) and whose pixels are cut short."""
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def test_imagefolder_skips_files_that_do_not_decode_before_training(tmp_path):
    write_class_tree(tmp_path, {"a": 3, "b": 3})
    _truncated(tmp_path / "b" / "002.png")
    Image.fromarray(np.full((4, 4), 255.0, np.float32)).save(tmp_path / "a" / "float.tif")  # not in [0, 1]
    data = load_dataset(tmp_path, query_per_class=1)
    paths = data.query.paths + data.train.paths
    assert len(paths) == 5 and tmp_path / "b" / "002.png" not in paths
    assert [(s.path, s.reason.split(":")[0]) for s in data.skipped] == [
        ("a/float.tif", "float samples span 255 to 255; a float image must hold values in [0, 1]"),
        ("b/002.png", "cannot decode")]
    for split in (data.train, data.query):  # so no epoch meets a file it cannot read
        assert all(split.image(i).shape == (5, 6, 3) for i in range(len(split)))


def test_imagefolder_too_few_images_names_the_class(tmp_path):
    write_class_tree(tmp_path, {"big": 20, "tiny": 4})
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path), "class tiny has 4 images")


# --- listfile ------------------------------------------------------------------------------


def write_lists(root: Path, rows: dict[str, list[str]]) -> None:
    for name, lines in rows.items():
        (root / name).write_text("\n".join(lines) + "\n")


def listfile_fixture(root: Path, multi: bool) -> None:
    for i in range(9):
        write_image(root / "img" / f"{i}.jpg", i)
    extra = "1" if multi else "0"
    write_lists(root, {
        "train.txt": ["img/0.jpg 1 0 0", "img/1.jpg 0 1 0", f"img/2.jpg 0 {extra} 1"],
        "test.txt": ["img/3.jpg 0 0 1", "", "img/4.jpg 1 0 0"],
        "database.txt": [f"img/{i}.jpg 0 1 0" for i in range(5, 9)],
    })


@pytest.mark.parametrize("multi", [False, True])
def test_listfile(tmp_path, multi):
    listfile_fixture(tmp_path, multi)
    data = load_dataset(tmp_path)
    assert data.name == "listfile" and data.num_classes == 3 and data.multilabel is multi
    assert (len(data.train), len(data.query), len(data.database)) == (3, 2, 4)
    assert data.train.labels.dtype == np.uint8 and data.train.labels.shape == (3, 3)
    assert data.train.labels[2].tolist() == [0, int(multi), 1]
    assert data.query.paths[1] == tmp_path / "img" / "4.jpg"
    assert data.query.image(1)[0, 0, 0] == 4


def test_listfile_image_root(tmp_path):
    lists, images = tmp_path / "lists", tmp_path / "pictures"
    lists.mkdir()
    for i in range(3):
        write_image(images / f"{i}.png", i)
    write_lists(lists, {n: [f"{i}.png 1 0" for i in range(3)] for n in ("train.txt", "test.txt", "database.txt")})
    data = load_dataset(f"listfile:{lists}", image_root=images)
    assert data.train.paths[2] == images / "2.png"


def test_listfile_missing_list(tmp_path):
    listfile_fixture(tmp_path, False)
    (tmp_path / "database.txt").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(f"listfile:{tmp_path}")
    assert_one_line_naming(err, str(tmp_path / "database.txt"), "not found")


def test_listfile_label_width_mismatch_names_both_lines(tmp_path):
    listfile_fixture(tmp_path, False)
    write_lists(tmp_path, {"test.txt": ["img/3.jpg 0 0 1", "img/4.jpg 1 0 0 0"]})
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, f"{tmp_path / 'test.txt'} line 2", "4 labels", f"{tmp_path / 'train.txt'} line 1")


def test_listfile_bad_label_value(tmp_path):
    listfile_fixture(tmp_path, False)
    write_lists(tmp_path, {"train.txt": ["img/0.jpg 1 0 0", "img/1.jpg 0 2 0"]})
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, f"{tmp_path / 'train.txt'} line 2", "'2'")


def test_listfile_missing_image(tmp_path):
    listfile_fixture(tmp_path, False)
    (tmp_path / "img" / "7.jpg").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "img" / "7.jpg"), "database.txt")


@pytest.mark.parametrize("spoil, words", [
    (lambda path: _truncated(path), "cannot decode"),
    (lambda path: Image.fromarray(np.zeros((4, 4), np.int32)).save(path, format="TIFF"), "32-bit signed integer"),
])  # fmt: skip
def test_listfile_image_that_does_not_decode_stops_the_load(tmp_path, spoil, words):
    listfile_fixture(tmp_path, False)
    spoil(tmp_path / "img" / "1.jpg")
    (tmp_path / "img" / "2.jpg").write_text("not an image")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, f"{tmp_path / 'img' / '1.jpg'}: image listed in {tmp_path / 'train.txt'}",
                           words, "(and 1 more)")


# --- cifar10 ------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_row(batch: int, index: int, label: int) -> np.ndarray:
    """A 32x32 image as a CIFAR row (R plane, G plane, B plane), tagged so it can be traced."""
    r = np.full((32, 32), batch, np.uint8)
    g = np.full((32, 32), index, np.uint8)
    b = np.full((32, 32), label, np.uint8)
    return np.concatenate([r.ravel(), g.ravel(), b.ravel()])


def write_cifar(root: Path, per_batch: int = 10) -> None:
    """data_batch_1..5 and test_batch with `per_batch` images each, labels cycling 0..9,
    pickled as the Python 2 originals are: dicts with bytes keys, protocol 2."""
    root.mkdir(parents=True, exist_ok=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [i % 10 for i in range(per_batch)]
        data = np.stack([cifar_row(b, i, labels[i]) for i in range(per_batch)])
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar_rows_decode_to_hwc_pixels(tmp_path):
    write_cifar(tmp_path)
    # Overwrite the first image with one whose channels are distinguishable everywhere.
    y, x = np.mgrid[0:32, 0:32]
    known = np.concatenate([(x * 8).ravel(), (y * 8).ravel(), np.full(1024, 7)]).astype(np.uint8)
    batch = pickle.loads((tmp_path / "data_batch_1").read_bytes())
    batch[b"data"][0] = known
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    data = load_dataset(f"cifar10:{tmp_path}", protocol="10000/50000")
    image = data.train.image(0)
    assert image.shape == (32, 32, 3)
    assert image[3, 5].tolist() == [40, 24, 7]  # row y=3, column x=5: R = 8x, G = 8y
    assert np.array_equal(image[..., 0], x * 8) and np.array_equal(image[..., 1], y * 8)


@pytest.mark.parametrize(
    "protocol, sizes",
    [("1000/5000/54000", (20, 10, 30)), ("1000/5000/59000", (20, 10, 50)), ("10000/50000", (50, 10, 50))],
)
def test_cifar_protocols_scaled(tmp_path, protocol, sizes):
    write_cifar(tmp_path)  # 60 images, 6 per class
    kwargs = {} if protocol == "10000/50000" else dict(query_per_class=1, train_per_class=2)
    data = load_dataset(tmp_path, protocol=protocol, **kwargs)
    assert data.name == "cifar10" and data.class_names == CIFAR_NAMES and not data.multilabel
    assert (len(data.train), len(data.query), len(data.database)) == sizes
    tags = {k: {tuple(img[0, 0, :2]) for img in getattr(data, k).images} for k in ("train", "query", "database")}
    assert not tags["query"] & tags["train"] and not tags["query"] & tags["database"]
    assert (tags["train"] <= tags["database"]) == (protocol != "1000/5000/54000")
    for split in (data.train, data.query, data.database):  # label travels with its image
        assert np.array_equal(split.images[:, 0, 0, 2], split.labels)
    if protocol == "10000/50000":
        assert {t[0] for t in tags["query"]} == {5} and data.database is data.train


def test_cifar_default_protocol_is_the_papers(tmp_path):
    write_cifar(tmp_path)
    data = load_dataset(tmp_path, query_per_class=1, train_per_class=2, seed=4)
    assert len(data.database) == 50  # every non-query image: 59000 at full size
    same = load_dataset(tmp_path, query_per_class=1, train_per_class=2, seed=4)
    assert np.array_equal(same.query.images, data.query.images)


# DeepHash-pytorch's utils/tools.py `cifar_dataset`, its comments: test (query) / train / database sizes,
# and how its database is put together from the per-class draws.
DEEPHASH_SPLITS = {
    "cifar10": ((1000, 5000, 54000), "rest"),
    "cifar10-1": ((1000, 5000, 59000), "train+rest"),
    "cifar10-2": ((10000, 50000, 50000), "train"),
}


@pytest.mark.parametrize("name", sorted(DEEPHASH_SPLITS))
def test_deephash_protocol_names_on_full_size_labels(name):
    from dsah_rt.train.data.cifar10 import PROTOCOLS
    from dsah_rt.train.data.protocol import sample_indices

    (n_query, n_train, n_database), database_is = DEEPHASH_SPLITS[name]
    labels = np.repeat(np.arange(10), 6000)  # CIFAR-10: 10 classes x 6000 images
    train, query, database = sample_indices(labels, PROTOCOLS[name], seed=0, where="cifar")
    assert (len(query), len(train), len(database)) == (n_query, n_train, n_database)
    assert np.bincount(labels[query]).tolist() == [n_query // 10] * 10  # drawn per class, as theirs
    assert np.bincount(labels[train]).tolist() == [n_train // 10] * 10
    assert not np.intersect1d(query, train).size and not np.intersect1d(query, database).size
    rest = np.setdiff1d(np.arange(60000), np.union1d(query, train))
    expected = {"rest": rest, "train+rest": np.union1d(train, rest), "train": train}[database_is]
    np.testing.assert_array_equal(database, expected)


def test_deephash_protocol_names_load_a_cifar_folder(tmp_path):
    write_cifar(tmp_path)  # 60 images, 6 per class: the per-class counts scaled down
    scaled = dict(query_per_class=1, train_per_class=2)
    for name, in_database in (("cifar10", False), ("cifar10-1", True)):
        data = load_dataset(f"cifar10:{tmp_path}", protocol=name, **scaled)
        tags = {k: {tuple(img[0, 0, :2]) for img in getattr(data, k).images} for k in ("train", "query", "database")}
        assert (len(data.query), len(data.train), len(data.database)) == (10, 20, 50 if in_database else 30)
        assert (tags["train"] <= tags["database"]) == in_database and not tags["query"] & tags["database"]
    data = load_dataset(f"cifar10:{tmp_path}", protocol="cifar10-2", query_per_class=1, train_per_class=5)
    assert (len(data.query), len(data.train)) == (10, 50) and data.database is data.train
    # Drawn from all the images, not the official split: test_batch (tag 5) images in train, others in query.
    assert 5 in {int(img[0, 0, 0]) for img in data.train.images}
    assert {int(img[0, 0, 0]) for img in data.query.images} - {5}


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled byte for byte as Python 2's cPickle wrote CIFAR-10: str keys and
    buffers as BINSTRING, numpy referenced as numpy.core.multiarray."""
    rows, cols = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        + b"(K\x01" + struct.pack("<BiBi", ord("J"), rows, ord("J"), cols) + b"\x86"
        + b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(U\x04data" + array + b"U\x06labels" + label_list + b"u."


def test_cifar_reads_python2_pickles(tmp_path):
    write_cifar(tmp_path)
    data = np.stack([cifar_row(9, i, 3) for i in range(4)])
    (tmp_path / "test_batch").write_bytes(python2_batch(data, [3, 3, 3, 3]))
    assert pickle.loads((tmp_path / "test_batch").read_bytes(), encoding="bytes")[b"labels"] == [3] * 4
    loaded = load_dataset(tmp_path, protocol="10000/50000")
    assert loaded.query.labels.tolist() == [3] * 4
    assert loaded.query.image(2)[5, 6].tolist() == [9, 2, 3]


def test_cifar_errors(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "data_batch_3"), "not found")

    write_cifar(tmp_path)
    bad = {b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, protocol="10000/50000")
    assert_one_line_naming(err, str(tmp_path / "test_batch"), "(N, 3072)")

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": os.getcwd}))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "test_batch"), "refusing")

    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "test_batch"))

    write_cifar(tmp_path)
    with pytest.raises(DataError, match="unknown protocol"):
        load_dataset(tmp_path, protocol="500/100")


# --- mnist ---------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, 0x08 (unsigned byte), the number of dimensions, big-endian sizes, data."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = False, dot: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = labels * 20  # traceable
        images[:, 27, 3] = 255
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}{'.' if dot else '-'}idx{ndim}-ubyte"
            raw = idx_bytes(array)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)


@pytest.mark.parametrize("gz, dot", [(False, False), (True, False), (False, True)])
def test_mnist_idx(tmp_path, gz, dot):
    write_mnist(tmp_path, gz=gz, dot=dot)
    data = load_dataset(tmp_path, protocol="10000/60000")
    assert data.name == "mnist" and data.num_classes == 10
    assert (len(data.train), len(data.query), len(data.database)) == (30, 10, 30)
    image = data.query.image(3)
    assert image.shape == (28, 28, 3) and image[0, 0].tolist() == [60] * 3 and image[27, 3, 1] == 255


def test_mnist_sampled_protocols(tmp_path):
    write_mnist(tmp_path)  # 40 images, 4 per class
    for protocol, database in (("1000/5000/64000", 10), ("1000/5000/69000", 30)):
        data = load_dataset(f"fashion-mnist:{tmp_path}", protocol=protocol, query_per_class=1, train_per_class=2)
        assert (len(data.train), len(data.query), len(data.database)) == (20, 10, database)
        for split in (data.train, data.query, data.database):
            assert np.array_equal(split.images[:, 0, 0, 0], split.labels * 20)


def test_mnist_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">I", 0x00000803) + path.read_bytes()[4:])
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(path), "magic 0x00000803", "expected 0x00000801")


def test_mnist_size_mismatch_and_missing_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(path), "(10, 28, 28)")
    path.unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(path), "not found")


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, "t10k-labels-idx1-ubyte", "7 labels for 10 images")


# --- flowers17 -----------------------------------------------------------------------------


def write_flowers(root: Path) -> dict[str, np.ndarray]:
    """Splits over two images per part per class (of the real 40/20/20), 1-based like the
    original, stored as 1 x n double row vectors."""
    splits = {}
    for n in (1, 2, 3):
        for part, offset in (("trn", 0), ("val", 2), ("tst", 4)):
            numbers = np.array([c * 80 + offset + k + n for c in range(17) for k in (1, 2)], dtype=np.float64)
            splits[f"{part}{n}"] = numbers[None, :]
    scipy.io.savemat(root / "datasplits.mat", splits)
    for k in np.unique(np.concatenate([v.ravel() for v in splits.values()])).astype(int):
        write_image(root / "jpg" / f"image_{k:04d}.jpg", int((k - 1) // 80) * 10)
    return splits


def test_flowers17_paper_protocol(tmp_path):
    splits = write_flowers(tmp_path)
    data = load_dataset(tmp_path)
    assert data.name == "flowers17" and data.num_classes == 17
    assert (len(data.train), len(data.query)) == (68, 34) and data.database is data.train
    assert data.query.paths[0] == tmp_path / "jpg" / f"image_{int(splits['tst1'][0, 0]):04d}.jpg"
    # image_0081 is the first of class 1 (1-based numbering, 80 per class)
    assert data.train.labels.tolist() == sorted([c for c in range(17) for _ in range(4)])
    assert np.bincount(data.query.labels).tolist() == [2] * 17
    assert not set(data.query.paths) & set(data.train.paths)
    for i in (0, 30, 67):
        assert abs(int(data.train.image(i)[2, 2, 0]) - 10 * data.train.labels[i]) <= 3  # JPEG


def test_flowers17_label_arithmetic_at_class_edges(tmp_path):
    scipy.io.savemat(tmp_path / "datasplits.mat", {
        "trn1": np.array([[1, 80, 81]], float), "val1": np.array([[160]], float), "tst1": np.array([[161, 1360]], float)})
    for k in (1, 80, 81, 160, 161, 1360):
        write_image(tmp_path / "jpg" / f"image_{k:04d}.jpg", 0)
    data = load_dataset(f"flowers17:{tmp_path}")
    assert data.train.labels.tolist() == [0, 0, 1, 1] and data.query.labels.tolist() == [2, 16]


def test_flowers17_other_split_and_errors(tmp_path):
    write_flowers(tmp_path)
    assert load_dataset(tmp_path, split=3).query.paths[0].name == "image_0008.jpg"
    with pytest.raises(DataError, match="split must be 1, 2 or 3"):
        load_dataset(tmp_path, split=4)
    scipy.io.savemat(tmp_path / "datasplits.mat", {"trn1": np.array([[0, 1]], float)})
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "datasplits.mat"), "'trn1' holds 0")
    scipy.io.savemat(tmp_path / "datasplits.mat", {"trn1": np.array([[2]], float)})
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "datasplits.mat"), "no variable 'val1'")


def test_flowers17_missing_image(tmp_path):
    write_flowers(tmp_path)
    (tmp_path / "jpg" / "image_0005.jpg").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "jpg" / "image_0005.jpg"), "datasplits.mat")


# --- stanford dogs -------------------------------------------------------------------------

BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def cell(strings: list[str]) -> np.ndarray:
    """A MATLAB cell column, as savemat writes numpy object arrays."""
    out = np.empty((len(strings), 1), dtype=object)
    out[:, 0] = strings
    return out


def write_dogs(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> None:
    for name, per_class, start in (("train_list.mat", train_per_class, 0), ("test_list.mat", test_per_class, 100)):
        files, labels = [], []
        for c, breed in enumerate(BREEDS):
            for i in range(per_class):
                files.append(f"{breed}/{breed.split('-')[0]}_{start + i}.jpg")
                labels.append(c + 1)
                write_image(root / "Images" / files[-1], 50 * c)
        scipy.io.savemat(root / name, {"file_list": cell(files), "annotation_list": cell([f[:-4] for f in files]),
                                       "labels": np.array(labels, float)[:, None]})


def test_stanford_dogs(tmp_path):
    write_dogs(tmp_path)
    data = load_dataset(tmp_path)
    assert data.name == "stanford-dogs" and data.num_classes == 3
    assert data.class_names == ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]
    assert (len(data.train), len(data.query)) == (9, 6) and data.database is data.train
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.query.paths[2] == tmp_path / "Images" / BREEDS[1] / "n02085782_100.jpg"
    assert abs(int(data.query.image(5)[0, 0, 0]) - 100) <= 3


def test_stanford_dogs_errors(tmp_path):
    write_dogs(tmp_path)
    mat = scipy.io.loadmat(tmp_path / "test_list.mat")
    scipy.io.savemat(tmp_path / "test_list.mat", {"file_list": mat["file_list"], "labels": mat["labels"][:-1]})
    with pytest.raises(DataError) as err:
        load_dataset(f"stanford_dogs:{tmp_path}")
    assert_one_line_naming(err, str(tmp_path / "test_list.mat"), "6 files", "5 'labels'")
    write_dogs(tmp_path)
    (tmp_path / "Images" / BREEDS[2] / "n02085936_1.jpg").unlink()
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, "n02085936_1.jpg", "train_list.mat")


# --- cub200 --------------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


def write_cub(root: Path) -> None:
    lines = {"images.txt": [], "train_test_split.txt": [], "image_class_labels.txt": []}
    for i in range(1, 9):
        c = (i - 1) % 2
        path = f"{CUB_CLASSES[c]}/bird_{i:04d}.jpg"
        write_image(root / "images" / path, 100 * c)
        lines["images.txt"].append(f"{i} {path}")
        lines["train_test_split.txt"].append(f"{i} {int(i <= 6)}")
        lines["image_class_labels.txt"].append(f"{i} {c + 1}")
    lines["classes.txt"] = [f"{c + 1} {name}" for c, name in enumerate(CUB_CLASSES)]
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")


def test_cub200(tmp_path):
    write_cub(tmp_path)
    data = load_dataset(tmp_path)
    assert data.name == "cub200" and data.num_classes == 2
    assert data.class_names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert (len(data.train), len(data.query)) == (6, 2) and data.database is data.train
    assert data.query.labels.tolist() == [0, 1]
    assert data.query.paths[1] == tmp_path / "images" / CUB_CLASSES[1] / "bird_0008.jpg"
    assert abs(int(data.query.image(1)[0, 0, 0]) - 100) <= 3


def test_cub200_errors(tmp_path):
    write_cub(tmp_path)
    (tmp_path / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in range(1, 8)))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path / "train_test_split.txt"), "image id 8")
    write_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, f"{tmp_path / 'image_class_labels.txt'} line 2")


# --- digits ----------------------------------------------------------------------------------


def test_digits():
    from sklearn.datasets import load_digits

    data = load_dataset("digits", seed=3)
    per_class = np.bincount(load_digits().target)
    assert (len(data.query), len(data.train), len(data.database)) == (300, 600, per_class.sum() - 900)
    assert data.train.images.shape[1:] == (8, 8, 3) and data.train.images.dtype == np.uint8
    assert data.train.images.max() == 255 and set(np.unique(data.train.images)) <= {round(v * 255 / 16) for v in range(17)}
    assert np.bincount(data.query.labels).tolist() == [30] * 10
    bigger = load_dataset("digits", seed=3, train_in_database=True)
    assert len(bigger.database) == per_class.sum() - 300
    assert np.array_equal(bigger.query.images, data.query.images)


# --- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer, name",
    [
        (write_cifar, "cifar10"),
        (write_mnist, "mnist"),
        (write_flowers, "flowers17"),
        (write_dogs, "stanford-dogs"),
        (write_cub, "cub200"),
        (lambda root: listfile_fixture(root, False), "listfile"),
        (lambda root: write_class_tree(root, {"a": 12, "b": 12}), "imagefolder"),
    ],
)
def test_format_detected_from_folder(tmp_path, writer, name):
    writer(tmp_path)
    kwargs = {"query_per_class": 1, "train_per_class": 1} if name in ("cifar10", "mnist") else {}
    assert load_dataset(tmp_path, **kwargs).name == name


def test_registry_lists_every_format():
    assert set(DATASETS) == {"imagefolder", "listfile", "cifar10", "mnist", "flowers17", "stanford-dogs",
                             "cub200", "digits", "synthetic-fg"}


def test_registry_errors(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("no-such-set")
    assert_one_line_naming(err, "no-such-set", "not a dataset name", "cifar10")
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "missing"))
    assert_one_line_naming(err, str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert_one_line_naming(err, str(tmp_path), "not a recognised dataset folder", "data_batch_1")
    with pytest.raises(DataError) as err:
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    assert_one_line_naming(err, str(tmp_path / "nope"), "not found", "data_batch_1")
    with pytest.raises(DataError) as err:
        load_dataset("cifar10")
    assert_one_line_naming(err, "cifar10:/path/to/folder")
    with pytest.raises(DataError) as err:
        load_dataset("digits", colour=True)
    assert_one_line_naming(err, "digits", "'colour'", "query_per_class")
    with pytest.raises(DataError, match="reads no folder"):
        load_dataset(f"digits:{tmp_path}")
