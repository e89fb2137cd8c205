"""MNIST-family IDX files (MNIST, Fashion-MNIST, KMNIST share the format and file names).

`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`, each optionally gzipped (`.gz`) and with `.idx` in place of `-idx`
as some unpackers write it. An IDX file is a big-endian header (two zero bytes, a type byte,
0x08 = unsigned byte, and the number of dimensions), one uint32 per dimension, then the data.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split
from .protocol import OFFICIAL, Sampled, apply_protocol, resolve_protocol
from .registry import register_dataset

_UBYTE = 0x08

PROTOCOLS = {
    # CIFAR-10's protocols carried over: 100 query and 500 train per class.
    "1000/5000/69000": Sampled(100, 500, train_in_database=True),
    "1000/5000/64000": Sampled(100, 500, train_in_database=False),
    "10000/60000": OFFICIAL,
}
DEFAULT_PROTOCOL = "1000/5000/69000"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, as a uint8 array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    expected = (_UBYTE << 8) | ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        found = "a short file" if magic is None else f"magic 0x{magic:08x}"
        raise DataError(
            f"{path}: not an IDX file of {ndim}-D unsigned bytes ({found}, expected 0x{expected:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header cut short")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise DataError(
            f"{path}: header gives dimensions {dims} ({size} bytes) but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, prefix: str, kind: str, ndim: int) -> Path:
    stems = (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte")
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
    raise DataError(f"{root / stems[0]}: file not found (nor .gz)")


def _read_part(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find(root, prefix, "images", 3)
    labels_path = _find(root, prefix, "labels", 1)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return images, labels.astype(np.int64)


@register_dataset(
    "mnist",
    reads="MNIST-family IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...",
    detect=lambda root: any(root.glob("*idx3-ubyte*")),
    aliases=("fashion-mnist", "kmnist"),
)
def load_mnist(
    root: Path,
    *,
    seed: int,
    protocol: str = DEFAULT_PROTOCOL,
    query_per_class: int | None = None,
    train_per_class: int | None = None,
    train_in_database: bool | None = None,
) -> RetrievalData:
    """`protocol` is one of PROTOCOLS; the per-class options override a sampled one's numbers.
    Grey images are repeated into three identical channels."""
    chosen = resolve_protocol(
        protocol, PROTOCOLS, f"{root}", query_per_class=query_per_class,
        train_per_class=train_per_class, train_in_database=train_in_database,
    )
    (train_images, train_labels), (test_images, test_labels) = (
        _read_part(root, prefix) for prefix in ("train", "t10k")
    )
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{root}: train images are {train_images.shape[1:]} but t10k images {test_images.shape[1:]}")
    grey = np.concatenate([train_images, test_images])
    # A zero-stride view: only the rows a protocol picks get materialised as RGB.
    pool = Split(
        labels=np.concatenate([train_labels, test_labels]),
        images=np.broadcast_to(grey[..., None], (*grey.shape, 3)),
    )
    train, query, database = apply_protocol(
        pool, chosen, seed, str(root), official_train=len(train_labels)
    )
    return RetrievalData("mnist", train, query, database, int(pool.labels.max()) + 1, False, None)
