"""BinaryIndex: exact Hamming search over packed codes, with FAISS's small API."""

from __future__ import annotations

import numpy as np

from dsah_rt import hamming
from dsah_rt.codes import nbytes_for, to_packed
from dsah_rt.errors import CodesError


class BinaryIndex:
    """Exact search by Hamming distance; ties are ordered by database index (deterministic).

    `add` takes packed uint8 rows (or ±1 / 0/1 arrays); `search(q, k)` returns (distances int32,
    indices int64), both (len(q), k), like `faiss.IndexBinaryFlat.search`.
    """

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 1024:
            raise CodesError(f"code length {bits} bits is outside 1..1024")
        self.bits = bits
        self._words = np.zeros((0, (nbytes_for(bits) + 7) // 8), np.uint64)

    @property
    def ntotal(self) -> int:
        return len(self._words)

    def add(self, codes: np.ndarray) -> None:
        packed, _ = to_packed(codes, self.bits, where="database codes")
        self._words = np.concatenate([self._words, hamming.words(packed)]) if self.ntotal else hamming.words(packed)

    def _query_words(self, queries: np.ndarray) -> np.ndarray:
        packed, _ = to_packed(queries, self.bits, where="query codes")
        return hamming.words(packed)

    def rank_histograms(self, queries: np.ndarray) -> np.ndarray:
        """(Q, bits+1) int64: database codes at each Hamming distance from each query."""
        return hamming.distance_histograms(self._query_words(queries), self._words, self.bits)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by (distance, index). k may equal ntotal for a full ranking (a counting sort)."""
        if not 1 <= k <= self.ntotal:
            raise CodesError(f"k={k} must be between 1 and the database size {self.ntotal}")
        qw = self._query_words(queries)
        if k <= hamming.SMALL_K:
            return hamming.small_topk(qw, self._words, self.bits, k)
        hist = hamming.distance_histograms(qw, self._words, self.bits)
        return hamming.topk_from_histograms(qw, self._words, hist, k)
