"""Numba kernels of multi-index hashing (dsah_rt.index.mih), which `native_build` compiles into the
kernels' library (called through `mih_ops`): substring keys and the table sort, which build the
tables, and `probe_block`, the one probe-and-verify loop that top-k and range search share.

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
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dsah_rt.hamming import _distance, _popcount
from dsah_rt.mih_layout import BASE, BUCKET_BITS, FIRST, LENGTH, NO_LIMIT, PROBE_WEIGHT

# _BINOM[s, r]: the number of s-bit keys at Hamming distance r from a given one (probes per step).
_BINOM = np.array([[math.comb(s, r) for r in range(33)] for s in range(33)], np.int64)
CHUNK = 256  # candidates one branch-free loop counts against the bound (a bucket or more: 64 measured 5% slower)
# A bucket's first PREFETCH_LINES cache lines are requested PREFETCH_AHEAD pairs before it is verified
# (10M uniform 64-bit codes, 4 tables, k = 10, 2 threads: 0.084-0.102 s for 1,000 queries with whole
# buckets from 8-16 pairs ahead, 0.100-0.107 s with each bucket's first line alone).
PREFETCH_AHEAD = 16
PREFETCH_LINES = 32
# A step's pairs are heap-sorted, not counted, when the counting table has SORT_FEW x more digits.
SORT_FEW = 16


@intrinsic
def _prefetch(typingctx, rows, i):  # noqa: ARG001 - numba intrinsic signature
    """llvm.prefetch of item i of a 1-D array or row i of a 2-D one (read, all cache levels): no load waits for it."""
    sig = types.void(rows, i)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        item = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]] + [zero] * (aryty.ndim - 1))
        ptr = builder.bitcast(item, cgutils.voidptr_t)  # one declaration of the intrinsic for every dtype
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


@njit
def keys_block(rows, first, length, q0, nb, out):
    """Rows q0..q0+nb's keys for the substring [first, first + length) into out."""
    for i in range(q0, q0 + nb):
        out[i] = _key(rows[i], first, length)
    return 0


@njit
def counting_sort(digits, order, nbuckets, out, offsets):
    """`order` stably sorted by digits[order] into `out`, and the bucket offsets (nbuckets + 1,)."""
    offsets[:] = 0
    for i in order:
        offsets[digits[i] + 1] += 1
    for b in range(nbuckets):
        offsets[b + 1] += offsets[b]
    for i in order:  # offsets[d] serves as bucket d's cursor: it ends where bucket d + 1 starts ..
        out[offsets[digits[i]]] = i
        offsets[digits[i]] += 1
    for b in range(nbuckets, 0, -1):  # .. so one shift gives the starts back, without a cursor array
        offsets[b] = offsets[b - 1]
    offsets[0] = 0
    return 0


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
        least = NO_LIMIT  # the chunk's least distance: a running minimum, one vector op per code
        if nwords == 1:  # one word: the codes as one contiguous column, in a loop that vectorises;
            w = q[0]  # the distances are kept only for a chunk with a candidate
            # In whole turns of the vector loop (32 codes): the codes read past the chunk can only
            # send it to the exact path below, and the loop's narrower tail costs more than they do.
            for i in range(min(flat.shape[0], c0 + ((c1 - c0 + 31) & ~31)) - c0):
                least = min(least, _popcount(w ^ flat[np.uint64(c0 + i)]))
            if least > bound:
                continue
            for i in range(c1 - c0):
                dist[i] = _popcount(w ^ flat[np.uint64(c0 + i)])
        else:
            for p in range(c0, c1):
                dist[p - c0] = _distance(q, table, p, nwords)
            for i in range(c1 - c0):
                least = min(least, dist[i])
            if least > bound:
                continue
        # A candidate's id is a cache miss (the ids are not prefetched with the bucket): the chunk's
        # misses are requested together, and an id is read only for a code not found at an earlier
        # step (which the code, in cache, tells). Reading every id took 8% of a 10M-code search.
        for p in range(c0, c1):
            if dist[p - c0] <= bound:
                _prefetch(ids, p)
        for p in range(c0, c1):
            d = dist[p - c0]
            if d > bound or not _first_found_here(table[p], qkeys, layout, j, r):
                continue
            entry = (d << 32) | np.int64(ids[p])
            if k > 0 and held == k and entry >= out[0]:
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


@njit(inline="always")
def _next_mask(mask):
    # Gosper's hack: the next larger integer with as many bits set.
    low_bit = mask & -mask
    ripple = mask + low_bit
    return (((ripple ^ mask) >> 2) // low_bit) | ripple


@njit(inline="always")
def _group_by_bucket(keys, who, n, shift, bucket_bits, counting_bits, skeys, swho, counts):
    """Pairs (keys[i], who[i]), i < n, into skeys/swho in the order of their buckets keys[i] >> shift,
    by a stable counting sort; bucket ids wider than `counting_bits` are sorted by their top bits (the
    order only decides which reads share the cache, never a result). Few pairs are sorted into the
    same order by a heap sort of (digit, i) in `counts` instead: clearing and summing 2**16 counts for
    every step cost a one-query search 0.3 ms of 0.57 at 10M 64-bit codes."""
    drop = shift + max(0, bucket_bits - counting_bits)
    digit_bits = min(bucket_bits, counting_bits)  # 20 at most (mih_ops): digit << digit_bits | i fits
    digits = 1 << digit_bits
    if n * SORT_FEW < digits:
        for i in range(n):
            counts[i] = ((keys[i] >> drop) << digit_bits) | i
        _sort_in_place(counts[:n], False)
        for t in range(n):
            i = counts[t] & (digits - 1)
            skeys[t], swho[t] = keys[i], who[i]
        return
    counts[: digits + 1] = 0
    for i in range(n):
        counts[(keys[i] >> drop) + 1] += 1
    for c in range(digits):
        counts[c + 1] += counts[c]
    for i in range(n):
        c = keys[i] >> drop
        skeys[counts[c]], swho[counts[c]] = keys[i], who[i]
        counts[c] += 1


@njit(inline="always")
def _sort_in_place(a, heap):
    """a ascending, in place (a heap sort: the kernels allocate nothing); `heap`: a is a max-heap already."""
    if not heap:
        for i in range(a.shape[0]):
            _heap_push(a, i, a[i])
    for end in range(a.shape[0] - 1, 0, -1):
        top = a[0]
        _heap_replace_root(a[:end], a[end])
        a[end] = top


@njit
def probe_block(qw, which, lims, rows, flat, perm, low, offsets, layout, k, radius, budget, out, held, max_pairs,
                counting_bits, ws):  # fmt: skip
    """Steps (r, j) = (0, 0), (0, 1), .., (0, m-1), (1, 0), .. for queries which[0..]: every key of
    table j within r bits of a query's; each item reached for the first time is verified by its full
    distance. The block takes each step together: its (bucket, query) pairs are grouped by bucket, so
    a bucket's codes are read from memory once for every query of the block that probes it (1,000
    queries of 64 bits into 10M codes in two blocks, 4 tables of 16 bits: ~4 queries of a block per
    probed bucket at radius 3). `flat`: every table's rows as one row of words.

    Query which[b]'s output is out[lims[which[b]]:lims[which[b] + 1]], sorted when the block ends.
    Top-k (k > 0): the k keys (distance << 32 | id) of a max-heap; held[b] = k. Range (k == 0): every
    item within `radius`, written when the slice has room (it may be empty, to count); held[b] = the
    count. held[b] = -1 once the query's work (candidates, and probes by PROBE_WEIGHT) passes `budget`;
    a step's probes count before it starts, so a step that alone would pass it is never begun.
    Returns 0, or minus the words of int64 scratch `ws` it needs when `ws` is smaller.
    """
    m, nb, n = layout.shape[0], which.shape[0], rows.shape[1]
    longest, most, widest = 0, 1, 0
    for j in range(m):
        longest = max(longest, layout[j, LENGTH])
        most = max(most, _BINOM[layout[j, LENGTH], layout[j, LENGTH] // 2])
        widest = max(widest, layout[j, BUCKET_BITS])
    # A step's pairs come in windows of at most max(nlive, max_pairs), so memory stays bounded at any radius.
    npairs = min(nb * most, max(nb, max_pairs))
    nmasks = min(most, max(1, max_pairs))
    need = nb * (m + 3) + CHUNK + 4 * npairs + nmasks + (1 << min(widest, counting_bits)) + 1
    if ws.shape[0] < need:
        return -need
    qkeys, o = ws[: nb * m], nb * m
    work, active, live = ws[o : o + nb], ws[o + nb : o + 2 * nb], ws[o + 2 * nb : o + 3 * nb]
    dist, o = ws[o + 3 * nb : o + 3 * nb + CHUNK], o + 3 * nb + CHUNK
    keys, who = ws[o : o + npairs], ws[o + npairs : o + 2 * npairs]
    skeys, swho = ws[o + 2 * npairs : o + 3 * npairs], ws[o + 3 * npairs : o + 4 * npairs]
    masks, counts = ws[o + 4 * npairs : o + 4 * npairs + nmasks], ws[o + 4 * npairs + nmasks : need]
    for b in range(nb):
        for j in range(m):
            qkeys[b * m + j] = _key(qw[which[b]], layout[j, FIRST], layout[j, LENGTH])
    held[:] = 0
    work[:] = 0
    active[:] = 1
    left = nb
    for r in range(longest + 1):
        for j in range(m):
            s = layout[j, LENGTH]
            if r > s or left == 0:
                continue
            shift = s - layout[j, BUCKET_BITS]
            base = layout[j, BASE]
            table = rows[j]
            tflat = flat[j * n * table.shape[1] : (j + 1) * n * table.shape[1]]
            line = max(1, 8 // table.shape[1])  # rows per 64-byte cache line
            probes = _BINOM[s, r]
            nlive = 0
            for b in range(nb):
                if active[b]:
                    work[b] += probes * PROBE_WEIGHT
                    if work[b] > budget:
                        active[b], held[b] = 0, -1
                        left -= 1
                    else:
                        live[nlive] = b
                        nlive += 1
            window = max(1, max_pairs // max(1, nlive))  # the step's masks, a window at a time
            mask = (np.int64(1) << r) - 1  # the smallest s-bit mask with r bits set
            for w0 in range(0, probes if nlive > 0 else 0, window):
                nm = min(probes, w0 + window) - w0
                for i in range(nm):  # the window's masks, shared by its queries
                    masks[i] = mask
                    if r > 0:
                        mask = _next_mask(mask)
                npair = 0
                for t in range(nlive):
                    for i in range(nm):
                        keys[npair], who[npair] = qkeys[live[t] * m + j] ^ masks[i], live[t]
                        npair += 1
                _group_by_bucket(keys, who, npair, shift, layout[j, BUCKET_BITS], counting_bits, skeys, swho, counts)
                for t in range(npair):
                    ahead = t + PREFETCH_AHEAD
                    if ahead < npair and skeys[ahead] != skeys[ahead - 1]:  # a later pair's bucket starts loading now
                        c0, c1 = offsets[base + (skeys[ahead] >> shift)], offsets[base + (skeys[ahead] >> shift) + 1]
                        for row in range(c0, min(c1, c0 + PREFETCH_LINES * line), line):
                            _prefetch(table, row)
                    b = swho[t]
                    if not active[b]:
                        continue
                    lo, hi = offsets[base + (skeys[t] >> shift)], offsets[base + (skeys[t] >> shift) + 1]
                    if shift > 0:  # a shared bucket: narrow it to this key's low bits
                        below = low[j, lo:hi]
                        rest = skeys[t] & ((np.int64(1) << shift) - 1)
                        lo, hi = lo + np.searchsorted(below, rest), lo + np.searchsorted(below, rest, side="right")
                    work[b] += hi - lo
                    if work[b] > budget:
                        active[b], held[b] = 0, -1
                        left -= 1
                        continue
                    q = which[b]
                    held[b] = _verify(qw[q], table, tflat, perm[j], lo, hi, qkeys[b * m : (b + 1) * m], layout, j, r, k,
                                      radius, held[b], out[lims[q] : lims[q + 1]], dist)  # fmt: skip
            # Exact from here (pigeonhole, see dsah_rt.index.mih): every item within m*r + j is found.
            reach = m * r + j
            for t in range(nlive):
                b = live[t]
                if active[b] and (reach >= radius if k == 0 else held[b] == k and (out[lims[which[b]]] >> 32) <= reach):
                    active[b] = 0
                    left -= 1
    for b in range(nb):
        q = which[b]
        if held[b] > 0:
            _sort_in_place(out[lims[q] : lims[q] + min(held[b], lims[q + 1] - lims[q])], k > 0)
    return 0
