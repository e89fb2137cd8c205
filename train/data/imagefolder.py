"""ImageFolder trees: `root/<class>/<image>`, or one such tree per protocol split.

`root/train/`, `root/query/` (or `root/test/`) and optionally `root/database/` (default: the
train set, the fine-grained protocol) give the splits directly; a plain class tree is split by
seeded per-class sampling.

Which files are images is `encode`'s rule (`dsah_rt.images.find_images`: by content, every
subfolder of a class folder searched), so a folder trained on and the same folder encoded hold
the same images; the others are listed, with the reason, in `RetrievalData.skipped` (which
`dsah-rt train` prints). Every file is decoded once while loading, so one that is truncated, or
whose samples have no 8-bit reading, is such a skip before training starts, not an error after
an epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError
from dsah_rt.encode import first_skips
from dsah_rt.images import Skip, find_images, skip_reason

from .core import RetrievalData, Split
from .protocol import Sampled, apply_protocol
from .registry import register_dataset

_QUERY_FOLDERS = ("query", "test")


def _has_split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and any((root / q).is_dir() for q in _QUERY_FOLDERS)


def _detect(root: Path) -> bool:
    if _has_split_folders(root):
        return True
    # One level only: a deep scan of a large tree just to recognise it would be slow.
    with os.scandir(root) as entries:
        for d in entries:
            if d.is_dir() and not d.name.startswith("."):
                with os.scandir(d.path) as files:
                    if any(f.is_file() and skip_reason(f.path) is None for f in files):
                        return True
    return False


def _class_images(folder: Path, where: str = "") -> tuple[dict[str, list[Path]], list[Skip]]:
    """Image paths (byte order, recursive) under each class subfolder that holds any, and the
    files skipped there, named relative to the dataset root (`where` is `folder`'s part of it)."""
    out, skipped = {}, []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = find_images(d)
        skipped += [Skip(f"{where}{d.name}/{s.path}", s.reason) for s in found.skipped]
        if found.files:
            out[d.name] = [d / rel for rel in found.files]
    return out, skipped


def _tree_split(tree: dict[str, list[Path]], class_index: dict[str, int]) -> Split:
    paths = [p for name in tree for p in tree[name]]
    labels = np.array([class_index[name] for name in tree for _ in tree[name]], dtype=np.int64)
    return Split(labels=labels, paths=paths)


@register_dataset(
    "imagefolder",
    reads="class subfolders of images, or train/ and query/ (or test/) trees of them",
    detect=_detect,
    generic=True,
)
def load_imagefolder(
    root: Path,
    *,
    seed: int,
    query_per_class: int | None = None,
    train_per_class: int | None = None,
    train_in_database: bool | None = None,
) -> RetrievalData:
    """Without split folders: `query_per_class` (default 10) query images per class, then
    `train_per_class` train images (default: all the rest); the database is the images left
    plus, if `train_in_database` (default true), the train images."""
    if _has_split_folders(root):
        given = [k for k, v in dict(query_per_class=query_per_class, train_per_class=train_per_class,
                                     train_in_database=train_in_database).items() if v is not None]
        if given:
            raise DataError(f"{root}: has train/ and query/ folders, so {', '.join(given)} cannot apply")
        return _load_split_folders(root)
    tree, skipped = _class_images(root)
    if not tree:
        raise DataError(f"{root}: no class subfolders holding images{_first_skips(skipped)}")
    names = list(tree)
    pool = _tree_split(tree, {name: i for i, name in enumerate(names)})
    protocol = Sampled(
        query_per_class=10 if query_per_class is None else query_per_class,
        train_per_class=train_per_class,
        train_in_database=True if train_in_database is None else train_in_database,
    )
    train, query, database = apply_protocol(pool, protocol, seed, str(root), class_names=names)
    return RetrievalData("imagefolder", train, query, database, len(names), False, names, skipped)


def _load_split_folders(root: Path) -> RetrievalData:
    query_dirs = [root / q for q in _QUERY_FOLDERS if (root / q).is_dir()]
    if len(query_dirs) > 1:
        raise DataError(f"{root}: has both query/ and test/; keep one as the query set")
    folders = {"train": root / "train", "query": query_dirs[0]}
    if (root / "database").is_dir():
        folders["database"] = root / "database"
    trees, skipped = {}, []
    for k, f in folders.items():
        trees[k], skips = _class_images(f, f"{f.name}/")
        skipped += skips
        if not trees[k]:
            raise DataError(f"{f}: no class subfolders holding images{_first_skips(skips)}")
    names = sorted(set().union(*trees.values()))
    index = {name: i for i, name in enumerate(names)}
    splits = {k: _tree_split(tree, index) for k, tree in trees.items()}
    return RetrievalData(
        "imagefolder", splits["train"], splits["query"], splits.get("database", splits["train"]),
        len(names), False, names, skipped,
    )


def _first_skips(skipped: list[Skip]) -> str:
    return f" (skipped {first_skips(skipped)})" if skipped else ""


def save_as_imagefolder(data: RetrievalData, root: Path | str, *, ext: str = ".png") -> Path:
    """Write `data` as `root/{train,query,database}/<class>/<n>.<ext>`, the layout that
    `load_dataset(root)` reads back. Lossless with ".png"; ".jpg" for smaller demo folders."""
    from PIL import Image

    if data.multilabel:
        raise DataError(f"{root}: multi-label data cannot be written as one folder per class")
    root = Path(root)
    names = data.class_names
    safe = names is not None and names == sorted(set(names)) and all(
        n and not n.startswith(".") and "/" not in n and os.sep not in n for n in names
    )
    # Folder names must sort in class-id order, or the classes come back renumbered.
    folders = names if safe else [f"{i:0{len(str(data.num_classes - 1))}d}" for i in range(data.num_classes)]
    for split_name in ("train", "query", "database"):
        split = getattr(data, split_name)
        digits = len(str(max(len(split) - 1, 0)))
        for i in range(len(split)):
            out = root / split_name / folders[int(split.labels[i])] / f"{i:0{digits}d}{ext}"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.image(i)).save(out)
    return root
