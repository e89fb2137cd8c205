"""CUB-200-2011: `images.txt` (id path), `train_test_split.txt` (id is_train),
`image_class_labels.txt` (id class, 1-based), optional `classes.txt` (class name), and the
`images/` folder the paths are relative to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split, require_files
from .registry import register_dataset


def _read_table(path: Path) -> dict[int, str]:
    """`id value` lines as {id: value}."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if not key.isdigit() or not value:
            raise DataError(f"{path} line {lineno}: expected 'id value', found {line.strip()!r}")
        if int(key) in table:
            raise DataError(f"{path} line {lineno}: id {key} listed twice")
        table[int(key)] = value
    return table


def _column(table: dict[int, str], ids: list[int], path: Path, allowed: set[str] | None = None) -> list[str]:
    """`table`'s values for `ids`, each id required, each value a whole number (in `allowed`)."""
    values = []
    for i in ids:
        if i not in table:
            raise DataError(f"{path}: no entry for image id {i} (listed in images.txt)")
        v = table[i]
        if not v.isdigit() or (allowed is not None and v not in allowed):
            raise DataError(f"{path}: image id {i} has value {v!r}")
        values.append(v)
    return values


def _class_name(entry: str) -> str:
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    number, dot, name = entry.partition(".")
    return name if dot and number.isdigit() else entry


@register_dataset(
    "cub200",
    reads="CUB-200-2011 images.txt, train_test_split.txt, image_class_labels.txt and images/",
    detect=lambda root: (root / "images.txt").is_file() and (root / "train_test_split.txt").is_file(),
    aliases=("cub-200-2011", "cub"),
)
def load_cub200(root: Path) -> RetrievalData:
    """train = database = the train split, query = the test split."""
    images = _read_table(root / "images.txt")
    ids = sorted(images)
    is_train = np.array(_column(_read_table(root / "train_test_split.txt"), ids,
                                root / "train_test_split.txt", {"0", "1"})) == "1"
    labels_path = root / "image_class_labels.txt"
    labels = np.array(_column(_read_table(labels_path), ids, labels_path), dtype=np.int64) - 1
    if labels.size and labels.min() < 0:
        raise DataError(f"{labels_path}: class ids are 1-based, found 0")
    paths = [root / "images" / images[i] for i in ids]
    require_files(paths, root / "images.txt")
    pool = Split(labels=labels, paths=paths)
    names = None
    if (root / "classes.txt").is_file():
        classes = _read_table(root / "classes.txt")
        names = [_class_name(classes.get(c + 1, str(c + 1))) for c in range(int(labels.max()) + 1)]
    train = pool.subset(np.flatnonzero(is_train))
    query = pool.subset(np.flatnonzero(~is_train))
    return RetrievalData("cub200", train, query, train, int(labels.max()) + 1, False, names)
