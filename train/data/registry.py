"""Datasets by name or by folder: the registry behind `load_dataset`."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsah_rt.errors import DataError

from .core import RetrievalData

Loader = Callable[..., RetrievalData]


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    load: Loader
    reads: str | None  # what the folder holds, for messages; None: nothing to read (generated or shipped)
    detect: Callable[[Path], bool] | None
    generic: bool  # tried only after every specific format failed to claim a folder
    options: tuple[str, ...]

    @property
    def takes_seed(self) -> bool:
        return "seed" in inspect.signature(self.load).parameters


DATASETS: dict[str, DatasetFormat] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_dataset(
    name: str,
    *,
    reads: str | None = None,
    detect: Callable[[Path], bool] | None = None,
    aliases: tuple[str, ...] = (),
    generic: bool = False,
) -> Callable[[Loader], Loader]:
    """Register a loader under `name`.

    A loader that reads a folder (`reads` given) takes it as its first argument; every other
    keyword parameter is an option of the dataset, and a `seed` parameter receives the seed.
    `detect(folder)` says whether a folder holds this format, for `load_dataset(path)`.
    """

    def decorate(load: Loader) -> Loader:
        params = inspect.signature(load).parameters
        options = tuple(
            p.name for p in params.values()
            if p.kind == p.KEYWORD_ONLY and p.name != "seed"
        )
        fmt = DatasetFormat(_key(name), load, reads, detect, generic, options)
        for key in (fmt.name, *map(_key, aliases)):
            if key in DATASETS or key in _ALIASES:
                raise ValueError(f"dataset name {key!r} registered twice")
            _ALIASES[key] = fmt.name
        DATASETS[fmt.name] = fmt
        return load

    return decorate


def load_dataset(spec: str | os.PathLike, *, seed: int = 0, **options: Any) -> RetrievalData:
    """Load a dataset given as a registered name ("digits", "synthetic-fg"), a folder (format
    detected from its contents) or "name:folder" ("cifar10:/data/cifar-10-batches-py").

    `seed` drives every random choice (protocol sampling, generated images); `options` are the
    format's own (e.g. protocol="1000/5000/59000" for cifar10).
    """
    fmt, root = _resolve(spec)
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        known = ", ".join(fmt.options) or "none"
        raise DataError(f"dataset {fmt.name}: unknown option {unknown[0]!r} (options: {known})")
    if fmt.takes_seed:
        options["seed"] = seed
    return fmt.load(root, **options) if fmt.reads is not None else fmt.load(**options)


def _resolve(spec: str | os.PathLike) -> tuple[DatasetFormat, Path | None]:
    text = os.fspath(spec)
    if not isinstance(spec, os.PathLike):
        name, colon, rest = text.partition(":")
        fmt = DATASETS.get(_ALIASES.get(_key(name), ""))
        if fmt is not None and colon:
            if fmt.reads is None:
                raise DataError(f"dataset {fmt.name} reads no folder; give it as just {fmt.name!r}")
            return fmt, _existing_folder(Path(rest).expanduser(), f"{fmt.reads}, for {fmt.name}")
        if fmt is not None:
            if fmt.reads is not None:
                raise DataError(
                    f"dataset {fmt.name} reads a local folder ({fmt.reads}): "
                    f"give it as {fmt.name}:/path/to/folder"
                )
            return fmt, None
    root = Path(text).expanduser()
    if not root.exists():
        raise DataError(
            f"{text}: no such dataset folder, and not a dataset name (known: {', '.join(DATASETS)})"
        )
    root = _existing_folder(root, "a dataset folder")
    for fmt in sorted(DATASETS.values(), key=lambda f: f.generic):
        if fmt.detect is not None and fmt.detect(root):
            return fmt, root
    expected = "; ".join(f"{f.name}: {f.reads}" for f in DATASETS.values() if f.detect is not None)
    raise DataError(f"{root}: not a recognised dataset folder (expected one of {expected})")


def _existing_folder(path: Path, expected: str) -> Path:
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "not found"
        raise DataError(f"{path}: {what} (expected {expected})")
    return path
