"""Oxford Flowers-17: `jpg/image_0001.jpg` .. `jpg/image_1360.jpg` and `datasplits.mat`.

The images come in class order, 80 per class (image k is class (k - 1) // 80). `datasplits.mat`
holds three train/validation/test splits, `trn1, val1, tst1`, `trn2`, ..., as 1-based image
numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split, mat_integers, read_mat, require_files
from .registry import register_dataset

NUM_CLASSES = 17
PER_CLASS = 80


@register_dataset(
    "flowers17",
    reads="Oxford Flowers-17 jpg/image_NNNN.jpg and datasplits.mat",
    detect=lambda root: (root / "datasplits.mat").is_file(),
    aliases=("flowers-17", "oxford-flowers17"),
)
def load_flowers17(root: Path, *, split: int = 1) -> RetrievalData:
    """The paper's protocol (section 4.1): train = trn<split> + val<split> (60 per class),
    query = tst<split>, database = train."""
    if split not in (1, 2, 3):
        raise DataError(f"{root}: flowers17 split must be 1, 2 or 3, got {split!r}")
    path = root / "datasplits.mat"
    mat = read_mat(path)
    trn, val, tst = (
        mat_integers(mat, f"{part}{split}", path, 1, NUM_CLASSES * PER_CLASS)
        for part in ("trn", "val", "tst")
    )
    train_numbers = np.sort(np.concatenate([trn, val]))
    overlap = np.intersect1d(train_numbers, tst)
    if overlap.size:
        raise DataError(f"{path}: image {overlap[0]} is in both tst{split} and trn{split}/val{split}")

    def split_of(numbers: np.ndarray) -> Split:
        paths = [root / "jpg" / f"image_{k:04d}.jpg" for k in numbers]
        require_files(paths, path)
        return Split(labels=(numbers - 1) // PER_CLASS, paths=paths)

    train = split_of(train_numbers)
    return RetrievalData("flowers17", train, split_of(np.sort(tst)), train, NUM_CLASSES, False, None)
