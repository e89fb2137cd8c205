"""MIHIndex: multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012 / TPAMI 2014), with the exact
kind's results to the last tie: top-k by (distance, database index), range search inclusive.

The code is cut into m substrings of nearly equal length (at most 32 bits), and table j lists the
items by substring j. A query runs steps (r, j) = (0, 0), (0, 1), .., (0, m-1), (1, 0), ..: probe
every key within r bits of the query's substring j and verify each item found by its full distance.

Why stopping is exact: after step (r, j), an item not yet found differs from the query by >= r + 1
bits in each of substrings 0..j and >= r bits in the others (else an earlier step found it), so by
>= m*r + j + 1 bits in all. Every item within m*r + j is found. Once the k-th best (distance, index)
found has distance <= m*r + j, nothing unseen can precede it: not closer, and not a tie either, since
all items at that distance are among those found. Range search stops once m*r + j >= radius.
An item is reached once per table, at step (d_i, i) with d_i its substring distance; it is taken at
the first of them, which the verification recognises from the d_i, so no visited set is kept.

When a query's probes and candidates pass the cost of a linear scan of one query (`scan_cost`), it is
answered by the linear scan of the exact kind instead: the same results. The scan of a whole batch
is several times cheaper per query than that, so a batch of at least 2 * SAMPLE queries first probes
an evenly spaced sample with the budget of a batched scan's query (`_scan_worth`), and when
SCAN_SHARE of it passes that, the whole batch is scanned (1,000 queries, 2 threads: uniform 128-bit
codes took 3.1x the scan's time at 10M codes and 3.6x at 1M without the sample). The sample is
skipped where uniform codes, whose neighbours lie farther than a learned code's, would cost under
half of that budget (`uniform_work`): probed apart from the batch, it costs ~15% of a search of 10M
clustered 64-bit codes.

The file: the exact kind's .npy of code rows (so `numpy.load` still opens the codes), then the tables
(`offsets`, `perm`, `low`, `rows`, each at a 64-byte boundary, dtypes and shapes following from bits,
ntotal and m), then a JSON footer {"format", "kind", "bits", "ntotal", "substrings", "arrays": {name:
byte offset}}, its length (8 bytes, little-endian) and the exact kind's magic b"DSAHIDX1": the exact
kind's container, with kind "mih". Opened with mmap, the tables stay in the file too.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from dsah_rt import mih_ops, popcount_numpy
from dsah_rt.atomic import atomic_write
from dsah_rt.codes import MAX_BITS, to_packed
from dsah_rt.errors import SearchIndexError
from dsah_rt.index.base import check_k, check_radius
from dsah_rt.index.exact import MAGIC, BinaryIndex, read_footer
from dsah_rt.mih_layout import BASE, BUCKET_BITS, FIRST, LENGTH, NO_LIMIT, PROBE_WEIGHT

FORMAT = "dsah-rt-mih/1"
MAX_SUBSTRING = 32
# Buckets of at least 2**16 keys: a key's bits below its bucket then fit uint16 (substrings <= 32).
MIN_BUCKET_BITS = 16
# Default substrings of about log2(N / ITEMS_PER_BUCKET) bits, not the paper's log2(N): a bucket's
# codes are contiguous here, so a candidate costs far less than a probe and fuller buckets pay.
ITEMS_PER_BUCKET = 64
# A candidate costs about as much as scanning SCAN_COST codes for one query (a probe, PROBE_WEIGHT
# times that: dsah_rt.mih_layout). Measured: 1.6 ns a candidate, 0.55 ns a scanned code (64 bits,
# 200k codes, one thread). A smaller budget sends queries to the scan that probing answers faster
# (1M uniform 64-bit codes: 0% scanned at 3, 22% and 1.4x the time at 8).
SCAN_COST = 3
# A batched scan's query costs about as much as ntotal * words / SCAN_WORTH candidates. Fallen out
# of budget at 8 (1,000 queries): 0% of 10M uniform or clustered 64-bit codes, 22% of 1M uniform
# 64-bit codes (where probing takes 0.65x the scan's time), 99% of 10M uniform 128-bit codes (3.1x),
# 100% of 1M uniform 128 and 256-bit codes (3.6x).
SCAN_WORTH = 8
SAMPLE = 16
SCAN_SHARE = 0.5
_ALIGN = 64
_KEY_ID = np.int64(0xFFFFFFFF)


def default_substrings(bits: int, ntotal: int) -> int:
    """m for `bits`-bit codes in a database of `ntotal`: substrings of about log2(ntotal / 64) bits."""
    target = max(1.0, math.log2(max(ntotal, 2) / ITEMS_PER_BUCKET))
    return min(bits, max(-(-bits // MAX_SUBSTRING), round(bits / target)))


def check_substrings(bits: int, m: int) -> None:
    fewest = -(-bits // MAX_SUBSTRING)
    if not fewest <= m <= bits:
        raise SearchIndexError(
            f"MIH{m}: {bits}-bit codes take {fewest}..{bits} substrings (each at most {MAX_SUBSTRING} bits)"
        )


def uniform_reach(bits: int, ntotal: int, k: int) -> int:
    """The distance to the k-th nearest of ntotal uniform random codes (its expected count reaches k)."""
    within, d = 1, 0
    while ntotal * within < k << bits and d < bits:
        d += 1
        within += math.comb(bits, d)
    return d


def uniform_work(layout: np.ndarray, ntotal: int, reach: int) -> float:
    """A query's expected work (candidates; probes weigh PROBE_WEIGHT) in uniform codes, probing the
    steps (r, j) until m*r + j >= reach."""
    m, work = len(layout), 0.0
    for step in range(reach + 1):
        r, j = divmod(step, m)
        s = int(layout[j, LENGTH])
        work += math.comb(s, r) * (PROBE_WEIGHT + ntotal / 2**s)
    return work


def substring_layout(bits: int, m: int, ntotal: int) -> np.ndarray:
    """(m, 4) int64 rows (first bit, length, bucket bits, base in offsets): lengths differ by at most 1;
    about one bucket per item where a substring is longer than log2(ntotal) bits."""
    lengths = np.array([bits // m + (j < bits % m) for j in range(m)], np.int64)
    layout = np.zeros((m, 4), np.int64)
    layout[:, LENGTH] = lengths
    layout[1:, FIRST] = np.cumsum(lengths)[:-1]
    layout[:, BUCKET_BITS] = np.minimum(lengths, max(MIN_BUCKET_BITS, ntotal.bit_length() - 1))
    layout[1:, BASE] = np.cumsum((1 << layout[:, BUCKET_BITS]) + 1)[:-1]
    return layout


class Tables(NamedTuple):
    """The kernels' arguments, in their order (see dsah_rt.mih_kernels)."""

    rows: np.ndarray  # (m, N, words) uint64: the codes in each table's order
    perm: np.ndarray  # (m, N) uint32: database id at each table position
    low: np.ndarray  # (m, N) uint16: key bits below the bucket; (m, 0) when every bucket is one key
    offsets: np.ndarray  # int64: bucket b of table j is [offsets[base_j + b], offsets[base_j + b + 1])
    layout: np.ndarray

    @staticmethod
    def shapes(layout: np.ndarray, ntotal: int, nwords: int) -> dict[str, tuple[type, tuple[int, ...]]]:
        """dtype and shape of each saved array (all but the layout, which bits, m and ntotal give)."""
        m = len(layout)
        shared = bool((layout[:, LENGTH] > layout[:, BUCKET_BITS]).any())
        return {
            "rows": (np.uint64, (m, ntotal, nwords)),
            "perm": (np.uint32, (m, ntotal)),
            "low": (np.uint16, (m, ntotal if shared else 0)),
            "offsets": (np.int64, (int(layout[-1, BASE] + (1 << layout[-1, BUCKET_BITS]) + 1),)),
        }


def build_tables(words: np.ndarray, layout: np.ndarray) -> Tables:
    """Each table sorted by key, stably (ties by id): one counting sort per table, two (low bits
    first, radix-style) where buckets hold several keys."""
    n, nwords = words.shape
    if n >= 2**32:
        raise SearchIndexError(f"an MIH index holds fewer than 2**32 codes, not {n}")
    arrays = {name: np.empty(shape, dtype) for name, (dtype, shape) in Tables.shapes(layout, n, nwords).items()}
    for j, (first, length, bucket_bits, base) in enumerate(layout):
        key = mih_ops.keys(words, first, length)
        shift = length - bucket_bits
        order = np.arange(n, dtype=np.uint32)
        if shift:
            order, _ = mih_ops.counting_sort(key & ((1 << shift) - 1), order, 1 << shift)
        perm, offsets = mih_ops.counting_sort(key >> shift, order, 1 << bucket_bits)
        arrays["perm"][j] = perm
        arrays["offsets"][base : base + len(offsets)] = offsets
        if shift:
            arrays["low"][j] = key[perm] & ((1 << shift) - 1)
        np.take(words, perm, axis=0, out=arrays["rows"][j])
    return Tables(layout=layout, **arrays)


class MIHIndex(BinaryIndex):
    """Exact search by multi-index hashing; `search` and `range_search` return what BinaryIndex does.

    Spec "MIH" (m from the database size when the tables are built) or "MIH<m>". The tables are
    built on the first search or save after an add. `scan_cost`: 0 never falls back to the linear scan.
    """

    kind = "mih"
    scan_cost = SCAN_COST

    def __init__(self, bits: int, substrings: int | None = None) -> None:
        super().__init__(bits)
        if substrings is not None:
            check_substrings(bits, substrings)
        self._requested = substrings

    @classmethod
    def accepts(cls, spec: str) -> bool:
        return re.fullmatch(r"MIH\d*", spec) is not None

    @classmethod
    def from_spec(cls, spec: str, bits: int) -> MIHIndex:
        return cls(bits, int(spec[3:]) if spec[3:] else None)

    @property
    def substrings(self) -> int:
        """m: the tables' substrings (the requested number, else chosen for the current size)."""
        return self._requested or default_substrings(self.bits, self.ntotal)

    def reset(self) -> None:
        super().reset()
        self._tables: Tables | None = None

    def add(self, codes: np.ndarray) -> None:
        super().add(codes)
        self._tables = None

    def tables(self) -> Tables:
        if self._tables is None:
            self._tables = build_tables(self._words, substring_layout(self.bits, self.substrings, self.ntotal))
        return self._tables

    def _budget(self) -> int:
        return self.ntotal // self.scan_cost if self.scan_cost else NO_LIMIT

    def _scan_worth(self) -> int:
        return max(1, self.ntotal * self._nwords // SCAN_WORTH)

    def _route(self, nq: int, reach: int, probe: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
        """Which of nq queries the linear scan answers. `probe(which, budget)` answers queries `which`
        by MIH and says which stayed in budget; a batch whose sample mostly did not is scanned.
        `reach`: the distance to which uniform codes would be probed."""
        scanned, rest = np.zeros(nq, bool), np.arange(nq)
        if (self.scan_cost and nq >= 2 * SAMPLE
                and uniform_work(self.tables().layout, self.ntotal, reach) >= self._scan_worth() / 2):  # fmt: skip
            sample = np.linspace(0, nq - 1, SAMPLE).astype(np.int64)
            scanned[sample] = ~probe(sample, min(self._budget(), self._scan_worth()))
            rest = np.delete(rest, sample)
            if scanned[sample].mean() >= SCAN_SHARE:
                scanned[rest] = True
                return scanned
        scanned[rest] = ~probe(rest, self._budget())
        return scanned

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_k(k, self.ntotal)
        if self.scan_cost and k * self.scan_cost >= self.ntotal:  # k candidates alone would cost a scan
            return super().search(queries, k)
        packed, _ = to_packed(queries, self.bits, where="query codes")
        qw, tables = popcount_numpy.words(packed), self.tables()
        entries = np.empty((len(qw), k), np.int64)

        def probe(which: np.ndarray, budget: int) -> np.ndarray:
            entries[which], ok = mih_ops.topk(qw[which], tables, k, budget)
            return ok

        scanned = self._route(len(qw), uniform_reach(self.bits, self.ntotal, k), probe)
        distances, indices = (entries >> 32).astype(np.int32), entries & _KEY_ID
        if scanned.any():
            distances[scanned], indices[scanned] = super().search(packed[scanned], k)
        return distances, indices

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_radius(radius)
        radius = min(radius, self.bits)  # the kernels take int64; nothing is farther than bits
        packed, _ = to_packed(queries, self.bits, where="query codes")
        qw, tables = popcount_numpy.words(packed), self.tables()
        counts = np.empty(len(qw), np.int64)

        def probe(which: np.ndarray, budget: int) -> np.ndarray:
            counts[which] = mih_ops.range_counts(qw[which], tables, radius, budget)
            return counts[which] >= 0

        scanned = self._route(len(qw), radius, probe)
        if scanned.any():
            slims, sdist, sidx = super().range_search(packed[scanned], radius)
            counts[scanned] = np.diff(slims)
        lims = np.concatenate([[0], np.cumsum(counts)])
        entries = np.empty(lims[-1], np.int64)
        mih_ops.range_fill(qw, tables, radius, np.flatnonzero(~scanned), lims, entries)
        distances, indices = (entries >> 32).astype(np.int32), entries & _KEY_ID
        if scanned.any():
            # Scanned queries' hits, moved from their packed run to their query's place.
            at = np.arange(len(sidx)) + np.repeat(lims[:-1][scanned] - slims[:-1], np.diff(slims))
            distances[at], indices[at] = sdist, sidx
        return lims, distances, indices

    def save(self, path: str | os.PathLike[str]) -> Path:
        tables = self.tables()

        def write(fh) -> None:
            np.save(fh, self._words.view(np.uint8), allow_pickle=False)
            where = {}
            for name in Tables.shapes(tables.layout, self.ntotal, self._nwords):
                fh.write(bytes(-fh.tell() % _ALIGN))
                where[name] = fh.tell()
                fh.write(np.ascontiguousarray(getattr(tables, name)).reshape(-1).view(np.uint8).data)
            footer = {"format": FORMAT, "kind": self.kind, "bits": self.bits, "ntotal": self.ntotal,
                      "substrings": len(tables.layout), "arrays": where}  # fmt: skip
            raw = json.dumps(footer).encode()
            fh.write(raw + len(raw).to_bytes(8, "little") + MAGIC)

        return atomic_write(path, write)

    @staticmethod
    def recognises(path: Path) -> bool:
        # The exact kind's container, told apart by the footer (so KINDS asks this kind first).
        return BinaryIndex.recognises(path) and read_footer(path)[0].get("kind") == MIHIndex.kind

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> MIHIndex:
        """Open a saved index; with mmap the codes and tables stay in the file."""
        path = Path(path)
        footer, end = read_footer(path)
        bits, ntotal, m, where = (footer.get(key) for key in ("bits", "ntotal", "substrings", "arrays"))
        if footer.get("format") != FORMAT or footer.get("kind") != cls.kind:
            raise SearchIndexError(f"{path}: not a {FORMAT} index (footer says {footer.get('format')!r})")
        if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS and isinstance(ntotal, int) and ntotal >= 0
                and isinstance(m, int) and isinstance(where, dict)):  # fmt: skip
            raise SearchIndexError(f"{path}: corrupt index footer (bits {bits!r}, ntotal {ntotal!r}, substrings {m!r})")
        try:
            index = cls(bits, m)
        except SearchIndexError as exc:
            raise SearchIndexError(f"{path}: corrupt index footer ({exc})") from None
        try:
            codes = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise SearchIndexError(f"{path}: corrupt index file ({exc})") from None
        if codes.dtype != np.uint8 or codes.shape != (ntotal, 8 * index._nwords):
            raise SearchIndexError(f"{path}: corrupt index file (codes {codes.dtype} {codes.shape}, not {ntotal} {bits}-bit codes)")
        layout = substring_layout(bits, m, ntotal)
        arrays, start = {}, codes.offset + codes.nbytes
        for name, (dtype, shape) in Tables.shapes(layout, ntotal, index._nwords).items():
            arrays[name] = _open_array(path, where.get(name), start, end, dtype, shape, mmap)
            start = where[name] + arrays[name].nbytes
        tables = Tables(layout=layout, **arrays)
        _check_offsets(path, tables, ntotal)
        # np.asarray drops the memmap subclass (a view, no copy); the kernels take plain arrays.
        index._buf = np.asarray(codes if mmap else np.array(codes)).view(np.uint64)
        index._n = ntotal
        index._tables = tables
        return index


def _open_array(path: Path, at: object, start: int, end: int, dtype: type, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
    """The array saved at byte `at`, which must lie between the previous array's end and the footer."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if not isinstance(at, int) or at < start or at % _ALIGN or at + size > end:
        raise SearchIndexError(f"{path}: corrupt index file ({shape} {np.dtype(dtype)} table array at {at!r})")
    if size == 0:  # numpy cannot map zero bytes
        return np.zeros(shape, dtype)
    mapped = np.memmap(path, dtype, "r", offset=at, shape=shape)
    return np.asarray(mapped) if mmap else np.array(mapped)


def _check_offsets(path: Path, tables: Tables, ntotal: int) -> None:
    """Bucket bounds are the kernels' only indices into the tables: a corrupt one must not be read."""
    for _, _, bucket_bits, base in tables.layout:
        bounds = tables.offsets[base : base + (1 << bucket_bits) + 1]
        if bounds[0] != 0 or bounds[-1] != ntotal or (np.diff(bounds) < 0).any():
            raise SearchIndexError(f"{path}: corrupt index file (bucket offsets out of order)")
