"""The Index protocol every search backend follows, and the argument checks they share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from dsah_rt.errors import CodesError, SearchIndexError


@runtime_checkable
class Index(Protocol):
    """Hamming search over packed codes (numpy packbits rows; ±1 and 0/1 arrays are packed on the way in).

    - `search(q, k)` -> (distances int32, indices int64), each (len(q), k), nearest first. Exact kinds
      order ties by database index; approximate kinds may miss neighbours and pad with index -1.
    - `range_search(q, radius)` -> (lims (len(q)+1,) int64, distances int32, indices int64), FAISS's
      layout: query i's hits, every code at distance <= radius, are [lims[i]:lims[i+1]], ordered by
      (distance, index).
    - `save(path)` writes one file atomically; `load(path, mmap)` opens it (mmap: leave codes in the file
      where the kind can).
    - `accepts(spec)`, `from_spec(spec, bits)` and `recognises(path)` let the factory pick the kind.
    """

    kind: ClassVar[str]
    bits: int

    @property
    def ntotal(self) -> int: ...

    def add(self, codes: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def reset(self) -> None: ...

    def save(self, path: str | os.PathLike[str]) -> Path: ...

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> Index: ...

    @classmethod
    def accepts(cls, spec: str) -> bool: ...

    @classmethod
    def from_spec(cls, spec: str, bits: int) -> Index: ...

    @staticmethod
    def recognises(path: Path) -> bool: ...


def check_k(k: int, ntotal: int) -> None:
    if not 1 <= k <= ntotal:
        raise CodesError(f"k={k} must be between 1 and the database size {ntotal}")


def check_radius(radius: int) -> None:
    if radius < 0:
        raise SearchIndexError(f"radius {radius} must be >= 0")
