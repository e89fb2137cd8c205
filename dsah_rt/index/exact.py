"""BinaryIndex: exact Hamming search over packed codes; ties are ordered by database index.

The saved file is a plain .npy of the rows as the kernels read them (uint8, N x 8*words: the packed
bytes zero-padded to whole 64-bit words), so `numpy.load(path, mmap_mode="r")` opens it and search runs
on the mapped pages without reading the file first. NumPy ignores what follows the array: a JSON footer
{"format", "kind", "bits", "ntotal"}, its length (8 bytes, little-endian) and the magic b"DSAHIDX1".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dsah_rt import popcount_numpy, ranking
from dsah_rt.atomic import atomic_write
from dsah_rt.codes import MAX_BITS, nbytes_for, to_packed
from dsah_rt.errors import CodesError, SearchIndexError
from dsah_rt.index.base import check_k, check_radius

MAGIC = b"DSAHIDX1"
FORMAT = "dsah-rt-index/1"
_TAIL = len(MAGIC) + 8  # footer length + magic


class BinaryIndex:
    """Exact search by Hamming distance; ties are ordered by database index (deterministic).

    `add` takes packed uint8 rows (or ±1 / 0/1 arrays); `search(q, k)` returns (distances int32,
    indices int64), both (len(q), k), like `faiss.IndexBinaryFlat.search`.
    """

    kind = "exact"

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= MAX_BITS:
            raise CodesError(f"code length {bits} bits is outside 1..{MAX_BITS}")
        self.bits = bits
        self._nwords = (nbytes_for(bits) + 7) // 8
        self.reset()

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return spec == cls.kind

    @classmethod
    def from_spec(cls, spec: str, bits: int) -> BinaryIndex:  # noqa: ARG003 - one spec, no options
        return cls(bits)

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def _words(self) -> np.ndarray:
        return self._buf[: self._n]

    def reset(self) -> None:
        self._buf = np.zeros((0, self._nwords), np.uint64)
        self._n = 0

    def add(self, codes: np.ndarray) -> None:
        packed, _ = to_packed(codes, self.bits, where="database codes")
        end = self._n + len(packed)
        # Capacity doubles, so n single-row adds copy O(n) rows in all; a mapped file is read-only
        # and is copied once, on the first add after load.
        if end > len(self._buf) or not self._buf.flags.writeable:
            grown = np.zeros((max(end, 2 * len(self._buf)), self._nwords), np.uint64)
            grown[: self._n] = self._words
            self._buf = grown
        # Written as bytes into zeroed rows: the padding to whole words stays zero.
        self._buf[self._n : end].view(np.uint8)[:, : packed.shape[1]] = packed
        self._n = end

    def _query_words(self, queries: np.ndarray) -> np.ndarray:
        packed, _ = to_packed(queries, self.bits, where="query codes")
        return popcount_numpy.words(packed)

    def rank_histograms(self, queries: np.ndarray) -> np.ndarray:
        """(Q, bits+1) int64: database codes at each Hamming distance from each query."""
        from dsah_rt import hamming  # Numba, imported when a kernel first runs

        return hamming.distance_histograms(self._query_words(queries), self._words, self.bits)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by (distance, index). k may equal ntotal for a full ranking (a counting sort)."""
        check_k(k, self.ntotal)
        qw = self._query_words(queries)
        if popcount_numpy.is_tiny(len(qw), self._n, qw.shape[1]):
            return popcount_numpy.topk(qw, self._words, k)
        if k <= ranking.SMALL_K:
            return ranking.topk(qw, self._words, self.bits, k)
        from dsah_rt import hamming  # Numba, imported for the rare k > SMALL_K (a counting sort)

        hist = hamming.distance_histograms(qw, self._words, self.bits)
        return hamming.topk_from_histograms(qw, self._words, hist, k)

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every code at distance <= radius, by (distance, index): (lims, distances, indices)."""
        from dsah_rt import hamming

        check_radius(radius)
        qw = self._query_words(queries)
        hist = hamming.distance_histograms(qw, self._words, self.bits)
        return hamming.range_from_histograms(qw, self._words, hist, radius)

    def save(self, path: str | os.PathLike[str]) -> Path:
        footer = json.dumps({"format": FORMAT, "kind": self.kind, "bits": self.bits, "ntotal": self._n}).encode()

        def write(fh) -> None:
            np.save(fh, self._words.view(np.uint8), allow_pickle=False)
            fh.write(footer + len(footer).to_bytes(8, "little") + MAGIC)

        return atomic_write(path, write)

    @staticmethod
    def recognises(path: Path) -> bool:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() < _TAIL:
                return False
            fh.seek(-len(MAGIC), os.SEEK_END)
            return fh.read() == MAGIC

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> BinaryIndex:
        """Open a saved index; with mmap the codes stay in the file (pages are read as search needs them)."""
        path = Path(path)
        footer, array_end = read_footer(path)
        bits, ntotal = footer.get("bits"), footer.get("ntotal")
        if footer.get("format") != FORMAT or footer.get("kind") != cls.kind:
            raise SearchIndexError(f"{path}: not a {FORMAT} exact index (footer says {footer.get('format')!r})")
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS or not isinstance(ntotal, int):
            raise SearchIndexError(f"{path}: corrupt index footer (bits {bits!r}, ntotal {ntotal!r})")
        index = cls(bits)
        try:
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SearchIndexError(f"{path}: corrupt index file ({exc})") from None
        whole = rows.offset + rows.nbytes == array_end  # no bytes missing or extra between array and footer
        if rows.dtype != np.uint8 or rows.shape != (ntotal, 8 * index._nwords) or not whole:
            raise SearchIndexError(
                f"{path}: corrupt index file (array {rows.dtype} {rows.shape} does not hold {ntotal} {bits}-bit codes)"
            )
        # np.asarray drops the memmap subclass (a view, no copy); the kernels take plain arrays.
        index._buf = np.asarray(rows if mmap else np.array(rows)).view(np.uint64)
        index._n = ntotal
        return index


def read_footer(path: Path) -> tuple[dict, int]:
    """The JSON footer and the offset where the array must end."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - _TAIL)
        length = int.from_bytes(fh.read(8), "little")
        if length > size - _TAIL:
            raise SearchIndexError(f"{path}: corrupt index footer (length {length} in a {size}-byte file)")
        fh.seek(size - _TAIL - length)
        raw = fh.read(length)
    try:
        footer = json.loads(raw)
    except ValueError as exc:
        raise SearchIndexError(f"{path}: corrupt index footer ({exc})") from None
    if not isinstance(footer, dict):
        raise SearchIndexError(f"{path}: corrupt index footer (not a JSON object)")
    return footer, size - _TAIL - length
