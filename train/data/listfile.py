"""The deep-hashing list-file convention (DPSH, DeepHash, HashNet codebases).

`train.txt`, `test.txt` (the query set; `query.txt` also accepted) and `database.txt`, one image
a line: `relative/path.jpg 0 1 0 ...`, the multi-hot label vector (one-hot for single-label
sets such as CIFAR-10; several ones for NUS-WIDE). Paths are relative to the folder holding
the lists unless `image_root` says otherwise.

A listed image is required, not skipped: loading decodes each one once (`require_files`) and stops
with one line naming the first that is missing or does not decode, and its list, so a bad file
fails before training rather than after an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split, require_files
from .registry import register_dataset

_QUERY_LISTS = ("test.txt", "query.txt")


def _detect(root: Path) -> bool:
    return (root / "train.txt").is_file() and (
        (root / "database.txt").is_file() or any((root / q).is_file() for q in _QUERY_LISTS)
    )


class _Width:
    """The label width of the first line read, which every later line must match."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.source = ""

    def check(self, width: int, where: str) -> None:
        if self.value is None:
            self.value, self.source = width, where
        elif width != self.value:
            raise DataError(f"{where}: {width} labels, but {self.source} has {self.value}")


def _read_list(path: Path, image_root: Path, width: _Width) -> Split:
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({e})") from e
    paths, bits = [], []
    for lineno, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path} line {lineno}"
        if len(tokens) < 2:
            raise DataError(f"{where}: expected 'image 0 1 0 ...', found no labels")
        row = "".join(tokens[1:])
        # Counting characters checks every token is a lone 0 or 1 at C speed (lists run to 270k lines).
        if row.count("0") + row.count("1") != len(tokens) - 1 or len(row) != len(tokens) - 1:
            bad = next(t for t in tokens[1:] if t not in ("0", "1"))
            raise DataError(f"{where}: label values must be 0 or 1, found {bad!r}")
        width.check(len(tokens) - 1, where)
        paths.append(image_root / tokens[0])
        bits.append(row)
    if not paths:
        raise DataError(f"{path}: list file has no entries")
    require_files(paths, path)
    labels = np.frombuffer("".join(bits).encode("ascii"), dtype=np.uint8) - ord("0")
    return Split(labels=labels.reshape(len(paths), -1), paths=paths)


@register_dataset(
    "listfile",
    reads="train.txt, test.txt and database.txt, lines of 'image/path 0 1 0 ...'",
    detect=_detect,
)
def load_listfile(root: Path, *, image_root: str | Path | None = None) -> RetrievalData:
    """Labels are always (N, C) uint8 multi-hot; `multilabel` is true when some row does not
    hold exactly one 1."""
    image_root = root if image_root is None else Path(image_root).expanduser()
    query_list = next((root / q for q in _QUERY_LISTS if (root / q).is_file()), root / _QUERY_LISTS[0])
    width = _Width()
    train, query, database = (
        _read_list(p, image_root, width)
        for p in (root / "train.txt", query_list, root / "database.txt")
    )
    multilabel = any(bool(np.any(s.labels.sum(axis=1) != 1)) for s in (train, query, database))
    return RetrievalData("listfile", train, query, database, int(width.value), multilabel, None)
