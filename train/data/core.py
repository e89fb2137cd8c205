"""The data model every format returns, and the file readers the formats share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dsah_rt.errors import DataError, display_path
from dsah_rt.images import ImageSkip, Skip, decode, decode_reasons


@dataclass(eq=False)
class Split:
    """One split (train, query or database) of a retrieval protocol.

    Exactly one of `images` (held in memory) and `paths` (decoded on access) is set.
    `labels` is (N,) int64 class ids, or (N, C) uint8 multi-hot for multi-label data.
    `boxes` is (N, 4) float (x0, y0, x1, y1) in pixels of the image as stored: the
    ground-truth box of the class-discriminative part where a dataset has one.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (self.images is None) == (self.paths is None):
            raise ValueError("a Split holds exactly one of images and paths")
        if self.labels.ndim not in (1, 2):
            raise ValueError(f"labels must be (N,) or (N, C), got shape {self.labels.shape}")
        if self.images is not None and (
            self.images.dtype != np.uint8 or self.images.ndim != 4
            or self.images.shape[-1] != 3 or len(self.images) != n
        ):
            raise ValueError(
                f"images must be ({n}, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths for {n} labels")
        if self.boxes is not None and self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be ({n}, 4), got {self.boxes.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Image `i` as HxWx3 uint8 RGB."""
        if self.images is not None:
            return self.images[i]
        return read_image(self.paths[i])

    def subset(self, index: np.ndarray) -> Split:
        """The rows `index` of this split, as a new split (in-memory images are copied)."""
        index = np.asarray(index, dtype=np.int64)
        return Split(
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
            boxes=None if self.boxes is None else self.boxes[index],
        )


@dataclass(eq=False)
class RetrievalData:
    """A dataset cut into the three sets of a retrieval protocol.

    `database` may be the very same Split object as `train` (the fine-grained protocols).
    `skipped` lists the files of a folder format that are not images, relative to its folder,
    with the reason (the rule of `dsah_rt.images`, as `encode` reports them).
    """

    name: str
    train: Split
    query: Split
    database: Split
    num_classes: int
    multilabel: bool
    class_names: list[str] | None = None
    skipped: list[Skip] = field(default_factory=list)


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB by `dsah_rt.images.decode`, the decoder `encode` uses; DataError if unreadable."""
    try:
        return decode(path)
    except ImageSkip as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def require_files(paths: Sequence[Path], listed_in: Path) -> None:
    """Fail at once, naming the first image that is missing or does not decode (`decode_reasons`:
    each decoded once), rather than mid-way through training: a listed image is not skipped."""
    where = f"image listed in {display_path(listed_in)}"
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{display_path(missing[0])}: {where} not found{_more(missing)}")
    bad = [(p, reason) for p, reason in zip(paths, decode_reasons(paths)) if reason is not None]
    if bad:
        raise DataError(f"{display_path(bad[0][0])}: {where} cannot be read ({bad[0][1]}){_more(bad)}")


def _more(failed: Sequence[object]) -> str:
    return f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""


def read_mat(path: Path) -> dict:
    """A MATLAB (v5) file's variables."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as e:  # scipy's answer to HDF5-based v7.3 files
        raise DataError(f"{path}: MATLAB v7.3 files are not supported; save it with -v7") from e
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable MATLAB file ({_cause(e)})") from e


def mat_variable(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = ", ".join(sorted(k for k in mat if not k.startswith("__")))
        raise DataError(f"{path}: no variable {key!r} (found: {found or 'none'})")
    return mat[key]


def mat_integers(mat: dict, key: str, path: Path, low: int, high: int) -> np.ndarray:
    """A numeric MATLAB variable as a flat int64 vector, every value checked to be in [low, high]."""
    values = np.asarray(mat_variable(mat, key, path)).ravel()
    if values.dtype.kind not in "iuf" or not np.all(np.round(values) == values):
        raise DataError(f"{path}: {key!r} must hold whole numbers")
    values = values.astype(np.int64)
    bad = values[(values < low) | (values > high)]
    if bad.size:
        raise DataError(f"{path}: {key!r} holds {bad[0]}, outside {low}..{high}")
    return values


def mat_strings(mat: dict, key: str, path: Path) -> list[str]:
    """A MATLAB cell array (or char matrix) of strings as a list."""
    values = np.asarray(mat_variable(mat, key, path)).ravel()
    if values.dtype.kind == "U":
        return [str(v).rstrip() for v in values]
    if values.dtype != object:
        raise DataError(f"{path}: {key!r} must be a cell array of strings")
    out = []
    for v in values:
        v = np.asarray(v).ravel()
        if v.size != 1 or v.dtype.kind != "U":
            raise DataError(f"{path}: {key!r} must be a cell array of strings")
        out.append(str(v[0]))
    return out


def _cause(e: BaseException) -> str:
    # One line: the CLI prints the message on a single line.
    return " ".join(str(e).split()) or type(e).__name__
