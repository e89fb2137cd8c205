"""Numba kernels of multi-index hashing (dsah_rt.index.mih): substring keys, table sorts, and the one
probe-and-verify loop that top-k and range search share.

Codes are uint64 word rows, as in dsah_rt.hamming. A table is described by one row of `layout`:
(first bit, length s, bucket bits t, base in `offsets`). Its key for a code is the code's bits
[first, first + s) in packbits order read as an s-bit integer; bucket b = key >> (s - t) holds the
table positions offsets[base + b] .. offsets[base + b + 1], sorted by key and then by id. `perm[j]`
maps a position to its database id, `low[j]` holds the key's s - t bits below the bucket (only when
s > t), and `rows[j]` the codes themselves in table order, so verifying a bucket reads contiguous
memory instead of one cache miss per candidate.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from dsah_rt.hamming import _distance, _popcount
from dsah_rt.mih_layout import BASE, BUCKET_BITS, FIRST, LENGTH, NO_LIMIT
from dsah_rt.numba_cache import kernel_cache

CACHE = kernel_cache(__file__)

# _BINOM[s, r]: the number of s-bit keys at Hamming distance r from a given one (probes per step).
_BINOM = np.array([[math.comb(s, r) for r in range(33)] for s in range(33)], np.int64)
# Work is counted in candidates (a sequential read of a row); a probe (random reads of offsets and
# rows) weighs as PROBE_WEIGHT of them.
PROBE_WEIGHT = 16
CHUNK = 256  # candidates one branch-free loop counts against the bound (a bucket or more: 64 measured 5% slower)
# Probes whose buckets are located together: their offsets are independent loads, so their cache
# misses overlap, where one probe at a time waited for each; each bucket's first cache line is
# requested as it is located, and while one bucket is verified, the first PREFETCH_LINES lines of
# the next one's codes. Measured 1.4-1.8x (10M uniform 64-bit codes, 4 substrings, k = 10, 2
# threads; 4 lines 1.2-1.3x, none 1.04x), and 1.06-1.08x more for the first line.
PROBE_BATCH = 32
PREFETCH_LINES = 16


@intrinsic
def _prefetch(typingctx, rows, i):  # noqa: ARG001 - numba intrinsic signature
    """llvm.prefetch of row i of a 2-D array (read, all cache levels): no load waits for it."""
    sig = types.void(rows, i)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], zero])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _byte(row, b):
    # Word w holds packed bytes 8w .. 8w+7, little-endian.
    return np.int64((row[b >> 3] >> np.uint64(8 * (b & 7))) & np.uint64(0xFF))


@njit(inline="always")
def _key(row, first, length):
    """Bits [first, first + length) of a code row as an integer, first bit most significant."""
    lo = first >> 3
    hi = (first + length - 1) >> 3
    v = np.int64(0)
    for b in range(lo, hi + 1):  # at most 5 bytes for 32 bits: fits in 40 bits
        v = (v << 8) | _byte(row, b)
    return (v >> (8 * (hi + 1) - first - length)) & ((np.int64(1) << length) - 1)


@njit(parallel=True, cache=CACHE)
def keys(rows, first, length):
    """(N,) int64: every row's key for the substring [first, first + length)."""
    out = np.empty(rows.shape[0], np.int64)
    for i in prange(rows.shape[0]):
        out[i] = _key(rows[i], first, length)
    return out


@njit(cache=CACHE)
def counting_sort(digits, order, nbuckets):
    """`order` stably sorted by digits[order], and the bucket offsets (nbuckets + 1,) int64."""
    offsets = np.zeros(nbuckets + 1, np.int64)
    for i in order:
        offsets[digits[i] + 1] += 1
    for b in range(nbuckets):
        offsets[b + 1] += offsets[b]
    cursor = offsets[:-1].copy()
    out = np.empty_like(order)
    for i in order:
        out[cursor[digits[i]]] = i
        cursor[digits[i]] += 1
    return out, offsets


@njit(inline="always")
def _heap_push(heap, held, key):
    # Max-heap of (distance << 32 | id): the root is the current k-th best.
    i = held
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] >= key:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = key


@njit(inline="always")
def _heap_replace_root(heap, key):
    n = heap.shape[0]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] > heap[c]:
            c += 1
        if heap[c] <= key:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = key


@njit(inline="always")
def _first_found_here(row, qkeys, layout, j, r):
    """Whether step (r, j) is the first to reach this item: the item is reached at (d_i, i) for every
    table i, d_i its substring distance, and steps run in (radius, table) order."""
    for i in range(layout.shape[0]):
        if i != j:
            d = _popcount(np.uint64(qkeys[i] ^ _key(row, layout[i, FIRST], layout[i, LENGTH])))
            if d < r or (d == r and i < j):
                return False
    return True


@njit(inline="always")
def _verify(q, table, flat, ids, lo, hi, qkeys, layout, j, r, k, radius, held, out, dist):
    """Table positions lo..hi-1 reached at step (r, j) into the heap or the range list; returns `held`.

    As in dsah_rt.hamming's top-k block: a chunk's distances in branch-free loops, and the scalar path
    only for a chunk with a candidate within the current bound (the k-th best distance, or the
    radius); nearly every chunk has none once the heap is full.
    """
    nwords = q.shape[0]
    for c0 in range(lo, hi, CHUNK):
        c1 = min(hi, c0 + CHUNK)
        bound = radius if k == 0 else (out[0] >> 32 if held == k else NO_LIMIT)
        close = 0
        if nwords == 1:  # one word: the codes as one contiguous column, counted in a loop that
            w = q[0]  # vectorises; the distances are kept only for a chunk with a candidate
            for i in range(c1 - c0):
                close += _popcount(w ^ flat[np.uint64(c0 + i)]) <= bound
            if close == 0:
                continue
            for i in range(c1 - c0):
                dist[i] = _popcount(w ^ flat[np.uint64(c0 + i)])
        else:
            for p in range(c0, c1):
                dist[p - c0] = _distance(q, table, p, nwords)
            for i in range(c1 - c0):
                close += dist[i] <= bound
            if close == 0:
                continue
        for p in range(c0, c1):
            d = dist[p - c0]
            entry = (d << 32) | np.int64(ids[p])
            if d > bound or (k > 0 and held == k and entry >= out[0]):
                continue
            if not _first_found_here(table[p], qkeys, layout, j, r):
                continue
            if k == 0:
                if out.shape[0] > 0:
                    out[held] = entry
                held += 1
            elif held < k:
                _heap_push(out, held, entry)
                held += 1
            else:
                _heap_replace_root(out, entry)
    return held


@njit(cache=CACHE)
def _probe(q, rows, perm, low, offsets, layout, k, radius, budget, out):
    """Steps (r, j) = (0, 0), (0, 1), .., (0, m-1), (1, 0), ..: every key of table j within r bits of
    the query's; each item reached for the first time is verified by its full distance.

    Top-k (k > 0): out is a max-heap of k keys (distance << 32 | id); returns k. Range (k == 0): every
    item within `radius` is written to out when out has room (out may be empty, to count); returns the
    count. Returns -1 as soon as the work (candidates, and probes by PROBE_WEIGHT) passes `budget`;
    a step's probes count before it starts, so a step that alone would pass it is never begun.
    """
    m = layout.shape[0]
    qkeys = np.empty(m, np.int64)
    dist = np.empty(CHUNK, np.int64)
    longest = 0
    for j in range(m):
        qkeys[j] = _key(q, layout[j, FIRST], layout[j, LENGTH])
        longest = max(longest, layout[j, LENGTH])
    held = 0
    work = 0
    los, his = np.empty(PROBE_BATCH, np.int64), np.empty(PROBE_BATCH, np.int64)
    for r in range(longest + 1):
        for j in range(m):
            s = layout[j, LENGTH]
            if r <= s:
                shift = s - layout[j, BUCKET_BITS]
                base = layout[j, BASE]
                table = rows[j]
                flat = table.reshape(-1)
                line = max(1, 8 // table.shape[1])  # rows per 64-byte cache line
                probes = _BINOM[s, r]
                work += probes * PROBE_WEIGHT
                if work > budget:
                    return -1
                mask = (np.int64(1) << r) - 1  # the smallest s-bit mask with r bits set
                for p0 in range(0, probes, PROBE_BATCH):
                    batch = min(probes, p0 + PROBE_BATCH) - p0
                    for b in range(batch):
                        key = qkeys[j] ^ mask
                        lo = offsets[base + (key >> shift)]
                        hi = offsets[base + (key >> shift) + 1]
                        if shift > 0:  # a shared bucket: narrow it to this key's low bits
                            part = low[j, lo:hi]
                            rest = key & ((np.int64(1) << shift) - 1)
                            lo, hi = lo + np.searchsorted(part, rest), lo + np.searchsorted(part, rest, side="right")
                        los[b], his[b] = lo, hi
                        if lo < hi:
                            _prefetch(table, lo)
                        if r > 0:  # Gosper's hack: the next larger mask with r bits set
                            low_bit = mask & -mask
                            ripple = mask + low_bit
                            mask = (((ripple ^ mask) >> 2) // low_bit) | ripple
                    for b in range(batch):
                        if b + 1 < batch:  # the next bucket's codes start loading during this one
                            for t in range(los[b + 1], min(his[b + 1], los[b + 1] + PREFETCH_LINES * line), line):
                                _prefetch(table, t)
                        work += his[b] - los[b]
                        if work > budget:
                            return -1
                        held = _verify(q, table, flat, perm[j], los[b], his[b], qkeys, layout, j, r, k, radius, held, out, dist)
            # Exact from here (pigeonhole, see dsah_rt.index.mih): every item within m*r + j is found.
            reach = m * r + j
            if k > 0:
                if held == k and (out[0] >> 32) <= reach:
                    return held
            elif reach >= radius:
                return held
    return held


# Each parallel kernel hands one query to a serial function, as in dsah_rt.hamming: the parfor pass
# then has nothing to transform inside the loop body.


@njit(cache=CACHE)
def _topk_one(q, rows, perm, low, offsets, layout, budget, out):
    if _probe(q, rows, perm, low, offsets, layout, out.shape[0], -1, budget, out) < 0:
        return False
    out[:] = np.sort(out)
    return True


@njit(parallel=True, cache=CACHE)
def topk(qw, rows, perm, low, offsets, layout, k, budget):
    """(Q, k) keys (distance << 32 | id) in ascending order, and whether each query stayed in budget
    (the rows of those that did not are undefined)."""
    nq = qw.shape[0]
    out = np.empty((nq, k), np.int64)
    ok = np.empty(nq, np.bool_)
    for i in prange(nq):
        ok[i] = _topk_one(qw[i], rows, perm, low, offsets, layout, budget, out[i])
    return out, ok


@njit(parallel=True, cache=CACHE)
def range_counts(qw, rows, perm, low, offsets, layout, radius, budget):
    """Items within `radius` of each query, or -1 where the query passed its budget."""
    nq = qw.shape[0]
    counts = np.empty(nq, np.int64)
    for i in prange(nq):
        counts[i] = _probe(qw[i], rows, perm, low, offsets, layout, 0, radius, budget, np.empty(0, np.int64))
    return counts


@njit(cache=CACHE)
def _range_one(q, rows, perm, low, offsets, layout, radius, out):
    _probe(q, rows, perm, low, offsets, layout, 0, radius, NO_LIMIT, out)
    out[:] = np.sort(out)


@njit(parallel=True, cache=CACHE)
def range_fill(qw, rows, perm, low, offsets, layout, radius, which, lims, out):
    """Query which[t]'s items, as sorted keys, into out[lims[q]:lims[q + 1]] (sized by range_counts)."""
    for t in prange(which.shape[0]):
        q = which[t]
        _range_one(qw[q], rows, perm, low, offsets, layout, radius, out[lims[q] : lims[q + 1]])
