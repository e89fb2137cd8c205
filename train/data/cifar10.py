"""CIFAR-10, "python version": `data_batch_1` .. `data_batch_5`, `test_batch`, `batches.meta`.

Each batch is a pickle of a dict with b"data", an (N, 3072) uint8 array whose rows hold a 32x32
image as the red plane, then green, then blue (each row-major), and b"labels", N ids in 0..9.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split
from .protocol import OFFICIAL, Sampled, apply_protocol, resolve_protocol
from .registry import register_dataset

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
NUM_CLASSES = 10

# Named by their query/train/database sizes on the full dataset.
PROTOCOLS = {
    # The paper's (section 4.1): 100 query and 500 train per class; the database is every
    # non-query image, so it contains the train set.
    "1000/5000/59000": Sampled(100, 500, train_in_database=True),
    # The variant where the database leaves out the train images.
    "1000/5000/54000": Sampled(100, 500, train_in_database=False),
    "10000/50000": OFFICIAL,
    # 1,000 query and 5,000 train per class drawn from all 60,000 images (not the official test
    # batch); the database is the train set.
    "10000/50000/50000": Sampled(1000, 5000, train_in_database=True),
}
# DeepHash-pytorch's names for its splits (utils/tools.py, `cifar_dataset`), so that a MAP measured
# here is comparable with one of theirs. Their `cifar10` is not this format's default protocol.
DEEPHASH_PROTOCOLS = {"cifar10": "1000/5000/54000", "cifar10-1": "1000/5000/59000", "cifar10-2": "10000/50000/50000"}
PROTOCOLS.update({name: PROTOCOLS[ours] for name, ours in DEEPHASH_PROTOCOLS.items()})
DEFAULT_PROTOCOL = "1000/5000/59000"

# Only what numpy needs to rebuild an array (and what Python 3 writes for bytes at protocol 2):
# an arbitrary pickle could run any code.
_NUMPY_REBUILDERS = frozenset({"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"})


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        if (module == "numpy" or module.startswith("numpy.")) and name in _NUMPY_REBUILDERS:
            if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
                module = "numpy._core" + module[len("numpy.core"):]  # skip numpy 2's deprecation shim
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (a CIFAR-10 python batch)")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the batches were pickled by Python 2, so their keys are bytes.
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (holds a {type(obj).__name__}, not a dict)")
    return obj


def _field(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path}: no {key!r} entry")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be {len(data)} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}")
    return decode_rows(data), labels.astype(np.int64)


def decode_rows(data: np.ndarray) -> np.ndarray:
    """(N, 3072) plane-major CIFAR rows to (N, 32, 32, 3) HWC RGB."""
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _class_names(root: Path) -> list[str] | None:
    path = root / "batches.meta"
    if not path.is_file():
        return None
    names = _field(_unpickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


@register_dataset(
    "cifar10",
    reads="CIFAR-10 python batches data_batch_1..5 and test_batch",
    detect=lambda root: (root / TRAIN_BATCHES[0]).is_file(),
    aliases=("cifar-10",),
)
def load_cifar10(
    root: Path,
    *,
    seed: int,
    protocol: str = DEFAULT_PROTOCOL,
    query_per_class: int | None = None,
    train_per_class: int | None = None,
    train_in_database: bool | None = None,
) -> RetrievalData:
    """`protocol` is one of PROTOCOLS (DeepHash-pytorch's cifar10, cifar10-1 and cifar10-2 among them);
    the per-class options override a sampled one's numbers."""
    chosen = resolve_protocol(
        protocol, PROTOCOLS, f"{root}", query_per_class=query_per_class,
        train_per_class=train_per_class, train_in_database=train_in_database,
    )
    batches = [_read_batch(root / name) for name in (*TRAIN_BATCHES, TEST_BATCH)]
    official_train = sum(len(labels) for _, labels in batches[:-1])
    pool = Split(
        labels=np.concatenate([labels for _, labels in batches]),
        images=np.concatenate([images for images, _ in batches]),
    )
    del batches
    names = _class_names(root)
    train, query, database = apply_protocol(
        pool, chosen, seed, str(root), official_train=official_train, class_names=names
    )
    return RetrievalData("cifar10", train, query, database, NUM_CLASSES, False, names)
