"""Stanford Dogs: `Images/<wnid>-<breed>/<file>.jpg` with `train_list.mat` and `test_list.mat`.

Each list holds `file_list`, a cell array of paths relative to `Images/`, and `labels`, the
1-based class of each file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split, mat_integers, mat_strings, read_mat, require_files
from .registry import register_dataset


def _read_list(root: Path, name: str) -> tuple[Split, dict[int, str]]:
    """The split, and the class folder of each class id it uses."""
    path = root / name
    mat = read_mat(path)
    files = mat_strings(mat, "file_list", path)
    labels = mat_integers(mat, "labels", path, 1, np.iinfo(np.int32).max) - 1
    if len(labels) != len(files):
        raise DataError(f"{path}: {len(files)} files in 'file_list' but {len(labels)} 'labels'")
    folders: dict[int, str] = {}
    for f, c in zip(files, labels.tolist()):
        folder = Path(f).parent.name
        if folders.setdefault(c, folder) != folder:
            raise DataError(f"{path}: class {c + 1} holds images of both {folders[c]}/ and {folder}/")
    paths = [root / "Images" / f for f in files]
    require_files(paths, path)
    return Split(labels=labels, paths=paths), folders


def _breed(folder: str) -> str:
    # "n02085620-Chihuahua" -> "Chihuahua"
    wnid, dash, breed = folder.partition("-")
    return breed if dash and wnid[:1] == "n" and wnid[1:].isdigit() else folder


@register_dataset(
    "stanford-dogs",
    reads="Stanford Dogs Images/ with train_list.mat and test_list.mat",
    detect=lambda root: (root / "train_list.mat").is_file(),
    aliases=("stanford-dogs-120", "dogs120"),
)
def load_stanford_dogs(root: Path) -> RetrievalData:
    """The paper's protocol (section 4.1): train = database = the train list, query = the test list."""
    train, train_folders = _read_list(root, "train_list.mat")
    query, test_folders = _read_list(root, "test_list.mat")
    folders = {**test_folders, **train_folders}
    for c, folder in test_folders.items():
        if folders[c] != folder:
            raise DataError(
                f"{root / 'test_list.mat'}: class {c + 1} is {folder}/ here "
                f"but {folders[c]}/ in train_list.mat"
            )
    num_classes = max(folders) + 1
    names = [_breed(folders[c]) if c in folders else str(c + 1) for c in range(num_classes)]
    return RetrievalData("stanford-dogs", train, query, train, num_classes, False, names)
