"""FaissIndex: FAISS binary indexes (BFlat, BIVF{nlist}, BHNSW{M}, ...) behind the Index protocol.

Built by FAISS's own factory strings with d = 8 x bytes per code: FAISS compares whole bytes, so a
12-bit code is a 16-bit FAISS vector whose four padding bits are zero in every code and change no
distance. Saved in FAISS's format, so `faiss.read_index_binary(path)` opens the file; being FAISS's,
the file records bytes per code, not our code length, so a loaded index reports bits = 8 x bytes.

Bit order: FAISS binary indexes only XOR and popcount bytes, so our MSB-first codes give the same
distances as in any order used on both sides; only vectors packed by FAISS's LSB-first
`real_to_binary` need `dsah_rt.codes.swap_bit_order` before they meet ours.

faiss is an optional dependency, imported only when a FAISS index is built or opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dsah_rt.atomic import atomic_write
from dsah_rt.codes import nbytes_for, to_packed
from dsah_rt.errors import SearchIndexError
from dsah_rt.index.base import check_k, check_radius


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("FAISS indexes need the faiss package: pip install faiss-cpu") from None
    return faiss


def _reason(exc: RuntimeError) -> str:
    """FAISS's message without its "Error in <C++ signature> at <file>:<line>: Error: '<check>' failed: "."""
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: ('.*?' failed: )?)?", "", str(exc).strip().splitlines()[0])


class FaissIndex:
    """A FAISS binary index; an untrained one (IVF) is trained on the first codes added."""

    kind = "faiss"

    def __init__(self, index: Any, bits: int, spec: str) -> None:
        self._index = index
        self.bits = bits
        self.spec = spec

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec.startswith("B")  # FAISS names every binary index type B...

    @classmethod
    def from_spec(cls, spec: str, bits: int) -> FaissIndex:
        faiss = _faiss()
        try:
            index = faiss.index_binary_factory(8 * nbytes_for(bits), spec)
        except RuntimeError as exc:
            raise SearchIndexError(f"FAISS cannot build {spec!r}: {_reason(exc)}") from None
        return cls(index, bits, spec)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def _packed(self, codes: np.ndarray, where: str) -> np.ndarray:
        return to_packed(codes, self.bits, where=where)[0]

    def add(self, codes: np.ndarray) -> None:
        packed = self._packed(codes, "database codes")
        try:
            if not self._index.is_trained:
                self._index.train(packed)
            self._index.add(packed)
        except RuntimeError as exc:
            raise SearchIndexError(f"{self.spec}: {_reason(exc)}") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_k(k, self.ntotal)
        distances, indices = self._index.search(self._packed(queries, "query codes"), k)
        return distances.astype(np.int32, copy=False), indices

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_radius(radius)
        try:
            # FAISS keeps distance < radius; the protocol's radius is inclusive.
            lims, distances, indices = self._index.range_search(self._packed(queries, "query codes"), radius + 1)
        except RuntimeError as exc:
            raise SearchIndexError(f"{self.spec}: {_reason(exc)}") from None
        # FAISS lists each query's hits in scan order; (distance, index) is the protocol's order.
        lims, distances = lims.astype(np.int64), distances.astype(np.int32)
        query = np.repeat(np.arange(len(lims) - 1), np.diff(lims))
        order = np.lexsort((indices, distances, query))
        return lims, distances[order], indices[order]

    def reset(self) -> None:
        self._index.reset()

    def save(self, path: str | os.PathLike[str]) -> Path:
        faiss = _faiss()
        return atomic_write(path, lambda fh: faiss.write_index_binary(self._index, faiss.PyCallbackIOWriter(fh.write)))

    @staticmethod
    def recognises(path: Path) -> bool:
        with open(path, "rb") as fh:
            return fh.read(2) == b"IB"  # the first two letters of every FAISS binary index's fourcc

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> FaissIndex:
        faiss = _faiss()
        try:
            index = faiss.read_index_binary(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as exc:
            raise SearchIndexError(f"{path}: not a readable FAISS binary index ({_reason(exc)})") from None
        return cls(index, index.d, type(index).__name__)
