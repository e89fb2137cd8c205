"""Numba kernels for Hamming ranking: distance histograms, counting top-k and index-order AP.

Everything here works on codes as uint64 words (packed bytes padded to 8-byte rows) and never builds a
queries x database matrix. A thread takes a block of queries and walks the database in cache-sized
tiles, so each tile is read from memory once per block instead of once per query.

Ranking is "by distance, ties by database index" everywhere. No kernel sorts: the per-query histogram
over distances 0..k gives every item's rank bucket (a counting sort), which is O(N) per query.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from dsah_rt import native
from dsah_rt.numba_cache import kernel_cache, skip_blas_probe

CACHE = kernel_cache(__file__)
skip_blas_probe()
numba.set_num_threads(min(native.threads(), numba.config.NUMBA_NUM_THREADS))  # what `native.set_threads` asked for

QUERY_BLOCK = 16
# Tile of database rows kept hot in L1/L2 while a query block sweeps it (in 64-bit words).
TILE_WORDS = 4096


@intrinsic
def _popcount(typingctx, x):  # noqa: ARG001 - numba intrinsic signature
    """LLVM ctpop: one `popcnt` instruction (np.bitwise_count does not compile in Numba)."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _lowest_bit(typingctx, x):  # noqa: ARG001 - numba intrinsic signature
    """LLVM cttz: the index of the lowest set bit of a nonzero word (one `tzcnt`)."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(inline="always")
def _distance(q, tile, j, nwords):
    # Codes up to 128 bits (48 included) take loop-free paths; a loop over words here gets vectorised
    # into an emulated vector popcount that is several times slower for short rows. The row index is
    # unsigned: with a signed one Numba adds a negative-index fix-up, and vectorised loads become gathers.
    u = np.uint64(j)
    if nwords == 1:
        return _popcount(q[0] ^ tile[u, 0])
    if nwords == 2:
        return _popcount(q[0] ^ tile[u, 0]) + _popcount(q[1] ^ tile[u, 1])
    d = 0
    for w in range(nwords):
        d += _popcount(q[w] ^ tile[u, w])
    return d


@njit(inline="always")
def _overlap(qlab, dblab, j, nlab):
    # Multi-hot words: relevant if any label is shared. 0/1 integer without data-dependent branches.
    u = np.uint64(j)
    if nlab == 1:
        return np.int64((qlab[0] & dblab[u, 0]) != 0)
    acc = np.uint64(0)
    for w in range(nlab):
        acc |= qlab[w] & dblab[u, w]
    return np.int64(acc != 0)


# Each parallel kernel only hands blocks of queries to a serial block function: Numba's parfor pass
# then has nothing to transform inside the block (it mis-compiled slot bookkeeping written inline).


@njit(cache=CACHE)
def _relevance_block(qw, dbw, qlab, dblab, bits, q0, nb, out):
    # One query at a time: unlike the label-free histogram, interleaving queries here measured slower.
    # Bin 2*d + relevant, so relevance costs no second increment.
    nwords = qw.shape[1]
    n = dbw.shape[0]
    nlab = qlab.shape[1]
    rows = max(64, TILE_WORDS // nwords)
    hist = np.zeros((nb, 2 * (bits + 1)), np.int32)
    for t0 in range(0, n, rows):
        t1 = min(n, t0 + rows)
        tile = dbw[t0:t1]
        labs = dblab[t0:t1]
        for qi in range(nb):
            q = qw[q0 + qi]
            ql = qlab[q0 + qi]
            h = hist[qi]
            for j in range(tile.shape[0]):
                h[2 * _distance(q, tile, j, nwords) + _overlap(ql, labs, j, nlab)] += 1
    out[q0 : q0 + nb] = hist.reshape(nb, bits + 1, 2)


@njit(parallel=True, cache=CACHE)
def relevance_histograms(qw, dbw, qlab, dblab, bits):
    """(Q, bits+1, 2) int64: counts per distance of irrelevant [.., 0] and relevant [.., 1] items."""
    nq = qw.shape[0]
    out = np.zeros((nq, bits + 1, 2), np.int64)
    for b in prange((nq + QUERY_BLOCK - 1) // QUERY_BLOCK):
        q0 = b * QUERY_BLOCK
        _relevance_block(qw, dbw, qlab, dblab, bits, q0, min(nq, q0 + QUERY_BLOCK) - q0, out)
    return out


@njit(cache=CACHE)
def _distance_block(qw, dbw, bits, q0, nb, out):
    # Four queries share each database word loaded and keep four independent histogram increments in
    # flight (the increments, not loads or popcounts, bound this loop). Padded queries use spare rows.
    nq, nwords = qw.shape
    n = dbw.shape[0]
    rows = max(64, TILE_WORDS // nwords)
    ngroups = (nb + 3) // 4
    hist = np.zeros((4 * ngroups, bits + 1), np.int32)
    for t0 in range(0, n, rows):
        tile = dbw[t0 : min(n, t0 + rows)]
        for g in range(ngroups):
            qa = qw[min(q0 + 4 * g, nq - 1)]
            qb = qw[min(q0 + 4 * g + 1, nq - 1)]
            qc = qw[min(q0 + 4 * g + 2, nq - 1)]
            qd = qw[min(q0 + 4 * g + 3, nq - 1)]
            ha, hb, hc, hd = hist[4 * g], hist[4 * g + 1], hist[4 * g + 2], hist[4 * g + 3]
            for j in range(tile.shape[0]):
                ha[_distance(qa, tile, j, nwords)] += 1
                hb[_distance(qb, tile, j, nwords)] += 1
                hc[_distance(qc, tile, j, nwords)] += 1
                hd[_distance(qd, tile, j, nwords)] += 1
    out[q0 : q0 + nb] = hist[:nb]


@njit(parallel=True, cache=CACHE)
def distance_histograms(qw, dbw, bits):
    """(Q, bits+1) int64: how many database codes lie at each distance from each query."""
    nq = qw.shape[0]
    out = np.zeros((nq, bits + 1), np.int64)
    for b in prange((nq + QUERY_BLOCK - 1) // QUERY_BLOCK):
        q0 = b * QUERY_BLOCK
        _distance_block(qw, dbw, bits, q0, min(nq, q0 + QUERY_BLOCK) - q0, out)
    return out


@njit(cache=CACHE)
def _cutoff(hist, k):
    """Distance t and count m such that the top k are all items below t plus the first m at t."""
    below = 0
    for d in range(hist.shape[0]):
        if below + hist[d] >= k:
            return d, k - below
        below += hist[d]
    return hist.shape[0] - 1, hist[hist.shape[0] - 1]


@njit(cache=CACHE)
def _place_block(qw, dbw, hist, cut, take, base, q0, nb, dist, idx):
    # Query q's items go to the flat dist/idx from base[q] on: every item at distance < cut[q], then
    # the first take[q] at cut[q] (the database is walked in index order, so ties go to the lower index).
    nwords = qw.shape[1]
    n = dbw.shape[0]
    rows = max(64, TILE_WORDS // nwords)
    # The block's cut-offs are copied into a local array element by element: read from the argument
    # (which the compiler cannot prove apart from the int64 output), or from a slice's .copy(), the
    # scan is slower (measured when the kernel was generalised for range search).
    cutoff = np.empty(nb, np.int64)
    limit = np.empty(nb, np.int64)
    slot = np.zeros((nb, hist.shape[1]), np.int64)  # next free output slot per distance
    for qi in range(nb):
        cutoff[qi] = cut[q0 + qi]
        start = base[q0 + qi]
        for d in range(cutoff[qi] + 1):
            slot[qi, d] = start
            start += hist[q0 + qi, d]
        limit[qi] = slot[qi, cutoff[qi]] + take[q0 + qi]
    for t0 in range(0, n, rows):
        tile = dbw[t0 : min(n, t0 + rows)]
        for qi in range(nb):
            q = qw[q0 + qi]
            c = cutoff[qi]
            s = slot[qi]
            for j in range(tile.shape[0]):
                d = _distance(q, tile, j, nwords)
                if d <= c:
                    p = s[d]
                    if d < c or p < limit[qi]:
                        dist[p] = d
                        idx[p] = t0 + j
                        s[d] = p + 1


@njit(parallel=True, cache=CACHE)
def _place(qw, dbw, hist, cut, take, base, dist, idx):
    """Items written straight into their sorted slot: slot = base + items at smaller distances + items
    at the same distance seen so far. Only items at or below the cut-off distance are touched."""
    nq = qw.shape[0]
    for b in prange((nq + QUERY_BLOCK - 1) // QUERY_BLOCK):
        q0 = b * QUERY_BLOCK
        _place_block(qw, dbw, hist, cut, take, base, q0, min(nq, q0 + QUERY_BLOCK) - q0, dist, idx)


def topk_from_histograms(qw, dbw, hist, k):
    """Exact top-k by (distance, index) given each query's distance histogram: (Q, k) int32, int64."""
    nq = len(qw)
    cum = np.cumsum(hist, axis=1)
    cut = (cum < k).sum(axis=1)  # the first distance by which k items are in
    rows = np.arange(nq)
    take = k - (cum[rows, cut] - hist[rows, cut])
    dist, idx = np.empty(nq * k, np.int32), np.empty(nq * k, np.int64)
    _place(qw, dbw, hist, cut, take, rows * k, dist, idx)
    return dist.reshape(nq, k), idx.reshape(nq, k)


def range_from_histograms(qw, dbw, hist, radius):
    """Every item within distance <= radius, by (distance, index), in FAISS's range layout
    (lims (Q+1,) int64, dist int32, idx int64): query q's items are [lims[q]:lims[q+1]]."""
    nq = len(qw)
    c = min(radius, hist.shape[1] - 1)
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(hist[:, : c + 1].sum(axis=1), out=lims[1:])
    dist, idx = np.empty(lims[-1], np.int32), np.empty(lims[-1], np.int64)
    _place(qw, dbw, hist, np.full(nq, c, np.int64), np.ascontiguousarray(hist[:, c]), lims[:-1], dist, idx)
    return lims, dist, idx


@njit(cache=CACHE)
def _compact(bd, bi, count, hist, bound, k):
    """Drop buffered items that can no longer make the top k: beyond the bound, or at the bound
    behind the first ones (ties go to the lower index, and the buffer is in index order)."""
    room_at_bound = k
    for t in range(bound):
        room_at_bound -= hist[t]
    kept = 0
    for i in range(count):
        d = bd[i]
        if d < bound or (d == bound and room_at_bound > 0):
            room_at_bound -= d == bound
            bd[kept] = d
            bi[kept] = bi[i]
            kept += 1
        elif d <= hist.shape[0] - 1:
            hist[d] -= 1
    return kept


# Top-k for k >= SAMPLE_MIN_K starts each query's bound from every (k // SAMPLE_PER_K)-th row of the
# database: about 64 sampled rows at the bound, so the bound is rarely too tight (then the block runs
# again from a loose bound: the result is exact either way).
SAMPLE_MIN_K = 256
SAMPLE_PER_K = 32


def _topk_kernel(nw: int):
    """`topk_block` for codes of nw words, nw in 1..4 a compile-time constant (0: any number of words).

    A constant word count leaves the distance loop-free, so the loop over rows vectorises (with
    AVX-512 VPOPCNTDQ, a vector popcount); with a loop over words inside, the compiler leaves it
    scalar (measured 8x slower). Rows are indexed unsigned: a signed index keeps Numba's negative-index
    fix-up, and the loads become gathers (measured 2x slower). Scratch is cut into 1-D rows, not
    reshaped: reshape calls a helper of Numba's runtime that the compiled library does not carry.
    """

    # The sweep keeps every distance for the rare candidate path (`take`) only where recomputing them
    # there costs more than the stores: measured through `dsah-rt search`, keeping them was 0.85-0.89x
    # at 64 bits (k = 10, 1000), 0.92-0.98x at 128 bits for k <= 100 (1.06-1.17x at k = 1000), and
    # 1.16x at 256 bits, k = 1000.
    KEEP = nw == 0 or nw >= 3

    @njit(inline="always")
    def distance(q, columns, stride, j):
        # columns: the tile word-major, word w of row j at w * stride + j
        u, step = np.uint64(j), np.uint64(stride)  # all unsigned: int64 + uint64 would be float64
        d = _popcount(q[0] ^ columns[u])
        if nw >= 2:
            u += step
            d += _popcount(q[1] ^ columns[u])
        if nw >= 3:
            u += step
            d += _popcount(q[2] ^ columns[u])
        if nw == 4:
            u += step
            d += _popcount(q[3] ^ columns[u])
        return d

    @njit(inline="always")
    def distances4(qa, qb, qc, qd, columns, stride, c0, c1, buf, keep):
        # The least distance of each of four queries to rows c0..c1 (at most 64) of the tile, and with
        # `keep` all of them, query i's at buf[64 i + j]: every load of the tile serves four queries,
        # and no branch is taken. A running minimum is one vector op per row and query where counting
        # the rows below a bound took three (compare, mask to vector, subtract).
        m = c1 - c0
        big = np.int64(1 << 30)
        ma = mb = mc = md = big
        if nw > 0:
            for j in range(m):
                da = distance(qa, columns, stride, c0 + j)
                db = distance(qb, columns, stride, c0 + j)
                dc = distance(qc, columns, stride, c0 + j)
                dd = distance(qd, columns, stride, c0 + j)
                if keep:
                    buf[j], buf[64 + j], buf[128 + j], buf[192 + j] = da, db, dc, dd
                ma, mb, mc, md = min(ma, da), min(mb, db), min(mc, dc), min(md, dd)
            return ma, mb, mc, md
        # Any number of words: summed word by word (each pass a vectorised loop; a loop over words
        # inside the loop over rows stays scalar).
        buf[:] = 0
        for w in range(qa.shape[0]):
            column = columns[w * stride + c0 : w * stride + c1]
            wa, wb, wc, wd = qa[w], qb[w], qc[w], qd[w]
            for j in range(m):
                x = column[j]
                buf[j] += _popcount(wa ^ x)
                buf[64 + j] += _popcount(wb ^ x)
                buf[128 + j] += _popcount(wc ^ x)
                buf[192 + j] += _popcount(wd ^ x)
        for j in range(m):
            ma, mb = min(ma, buf[j]), min(mb, buf[64 + j])
            mc, md = min(mc, buf[128 + j]), min(md, buf[192 + j])
        return ma, mb, mc, md

    @njit(inline="always")
    def gather(dbw, first, step, m, columns, rows):
        # Rows first, first + step, ... (m of them) into `columns`, word-major (word w of row j at
        # w * rows + j), for the vectorised distance loops.
        for j in range(m):
            for w in range(dbw.shape[1]):
                columns[w * rows + j] = dbw[np.uint64(first + j * step), w]

    @njit
    def take(q, columns, stride, c0, c1, t0, buf, p, k, ws, o, cap, bits):
        # The rare path: this query has an item below its bound among rows c0..c1 of the tile, whose
        # distances are at buf[p:] where the sweep kept them (KEEP), or are computed again here. Its
        # slot starts at ws[o] (candidates' distances, their indices, histogram, state); state is
        # (candidates kept, bound, items kept below the bound): the last moves the bound in O(1).
        # Offsets, not slices, are passed: building five slices per call cost 1.2-1.5x at k = 1000.
        bd, bi, hist = ws[o : o + cap], ws[o + cap : o + 2 * cap], ws[o + 2 * cap : o + 2 * cap + bits + 1]
        state = ws[o + 2 * cap + bits + 1 : o + 2 * cap + bits + 4]
        c, b, below = state[0], state[1], state[2]
        mask = np.uint64(0)  # rows below the bound, found in a vectorised loop without branches
        for j in range(c1 - c0):
            u = np.uint64(p + j)  # unsigned, as in `distance`, or the loop's loads become gathers
            if not KEEP:
                buf[u] = distance(q, columns, stride, c0 + j)
            mask |= np.uint64(buf[u] < b) << np.uint64(j)
        while mask:  # then the branchy part on those rows only, lowest first (index order)
            i = _lowest_bit(mask)
            mask &= mask - np.uint64(1)
            d = buf[p + i]
            if d < b:
                if c == bd.shape[0]:
                    c = _compact(bd, bi, c, hist, b, k)
                bd[c] = d
                bi[c] = t0 + c0 + i
                c += 1
                hist[d] += 1
                below += 1
                while below >= k:  # the bound moves down: k items already sit below it
                    b -= 1
                    below -= hist[b]
        state[0], state[1], state[2] = c, b, below

    @njit
    def sweep(qw, dbw, flat, bits, k, q0, slots, per_slot, columns, ws, buf):
        # Every slot's candidates from one pass over the database, tile by tile.
        nq, nwords = qw.shape
        n = dbw.shape[0]
        rows = columns.shape[0] // nwords
        cap = (per_slot - bits - 4) // 2
        for t0 in range(0, n, rows):
            m = min(n, t0 + rows) - t0
            if nw == 1:  # one word: the tile is its own single column
                cols, stride = flat[t0 : t0 + m], m
            else:  # transposed once per block, then swept by all of its queries
                gather(dbw, t0, 1, m, columns, rows)
                cols, stride = columns, rows
            for s in range(0, slots, 4):
                qa, qb = qw[min(q0 + s, nq - 1)], qw[min(q0 + s + 1, nq - 1)]
                qc, qd = qw[min(q0 + s + 2, nq - 1)], qw[min(q0 + s + 3, nq - 1)]
                base = s * per_slot
                states = (base + 2 * cap + bits + 1, base + per_slot + 2 * cap + bits + 1,
                          base + 2 * per_slot + 2 * cap + bits + 1, base + 3 * per_slot + 2 * cap + bits + 1)  # fmt: skip
                for c0 in range(0, m, 64):
                    c1 = min(m, c0 + 64)
                    least = distances4(qa, qb, qc, qd, cols, stride, c0, c1, buf, KEEP)
                    for i in range(4):
                        if least[i] < ws[states[i] + 1]:
                            q = qw[min(q0 + s + i, nq - 1)]
                            take(q, cols, stride, c0, c1, t0, buf, 64 * i, k, ws, base + i * per_slot, cap, bits)

    @njit
    def reset(qw, dbw, bits, k, q0, slots, per_slot, ws, columns, buf):
        # Empty candidate lists. The bound starts at bits + 1 (accepting everything), or, when
        # k > 0, where every (k // SAMPLE_PER_K)-th row predicts 2k items: a pass that starts loose
        # keeps about k (1 + ln(N / k)) candidates per query, one that starts tight about 2k.
        # The sampled rows are gathered a tile at a time and read by every query of the block from
        # there (read in place, a cache miss per row and query cost as much as the sample saved).
        nq, nwords = qw.shape
        n = dbw.shape[0]
        cap = (per_slot - bits - 4) // 2
        stride = k // SAMPLE_PER_K
        for s in range(slots):
            ws[s * per_slot : (s + 1) * per_slot] = 0
            ws[s * per_slot + 2 * cap + bits + 2] = bits + 1
        if stride <= 1:
            return
        rows = columns.shape[0] // nwords
        total = (n + stride - 1) // stride
        for t0 in range(0, total, rows):
            m = min(total, t0 + rows) - t0
            gather(dbw, t0 * stride, stride, m, columns, rows)
            for s in range(0, slots, 4):
                qa, qb = qw[min(q0 + s, nq - 1)], qw[min(q0 + s + 1, nq - 1)]
                qc, qd = qw[min(q0 + s + 2, nq - 1)], qw[min(q0 + s + 3, nq - 1)]
                oa = s * per_slot + 2 * cap  # the sample's histograms, in the slots' own (emptied after)
                ob, oc, od = oa + per_slot, oa + 2 * per_slot, oa + 3 * per_slot
                for c0 in range(0, m, 64):
                    c1 = min(m, c0 + 64)
                    distances4(qa, qb, qc, qd, columns, rows, c0, c1, buf, True)
                    for j in range(c1 - c0):  # four histograms in turn: four chains of increments, not one
                        ws[oa + buf[j]] += 1
                        ws[ob + buf[64 + j]] += 1
                        ws[oc + buf[128 + j]] += 1
                        ws[od + buf[192 + j]] += 1
        for s in range(slots):
            hist = ws[s * per_slot + 2 * cap : s * per_slot + 2 * cap + bits + 1]
            seen = 0
            for t in range(bits + 1):
                seen += hist[t] * stride
                if seen >= 2 * k:
                    ws[s * per_slot + 2 * cap + bits + 2] = t + 1
                    break
            hist[:] = 0

    @njit
    def compact_all(bits, k, nb, per_slot, ws):
        # Each slot's candidates cut to its best k; returns the fewest any slot kept.
        cap = (per_slot - bits - 4) // 2
        fewest = np.int64(k)
        for s in range(nb):
            o = s * per_slot
            state = ws[o + 2 * cap + bits + 1 : o + per_slot]
            state[0] = _compact(ws[o : o + cap], ws[o + cap : o + 2 * cap], state[0], ws[o + 2 * cap : o + 2 * cap + bits + 1], state[1], k)
            fewest = min(fewest, state[0])
        return fewest

    @njit
    def block(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws):
        nwords = qw.shape[1]
        n = dbw.shape[0]
        rows = max(64, TILE_WORDS // nwords)
        cap = 2 * k + 16
        slots = 4 * ((nb + 3) // 4)  # padded queries repeat the last one; their results are dropped
        per_slot = 2 * cap + bits + 1 + 3  # candidates' distances and indices, histogram, state
        need = slots * per_slot + nwords * rows + bits + 2 + 4 * 64
        if ws.shape[0] < need:
            return -need
        columns = ws[slots * per_slot : slots * per_slot + nwords * rows].view(np.uint64)
        slot = ws[slots * per_slot + nwords * rows : slots * per_slot + nwords * rows + bits + 2]
        buf = ws[slots * per_slot + nwords * rows + bits + 2 : need]
        sampled = k >= SAMPLE_MIN_K and n >= SAMPLE_PER_K * 64 * (k // SAMPLE_PER_K)
        reset(qw, dbw, bits, k if sampled else 0, q0, slots, per_slot, ws, columns, buf)
        sweep(qw, dbw, flat, bits, k, q0, slots, per_slot, columns, ws, buf)
        if compact_all(bits, k, nb, per_slot, ws) < k and sampled:
            # a bound from the sample was too tight for some query: the block again, from a loose one
            reset(qw, dbw, bits, 0, q0, slots, per_slot, ws, columns, buf)
            sweep(qw, dbw, flat, bits, k, q0, slots, per_slot, columns, ws, buf)
            compact_all(bits, k, nb, per_slot, ws)
        for s in range(nb):
            o = s * per_slot
            bd, bi = ws[o : o + cap], ws[o + cap : o + 2 * cap]
            c = ws[o + 2 * cap + bits + 1]
            # Counting sort of the k survivors by distance; stable, so ties stay in index order.
            slot[:] = 0
            for i in range(c):
                slot[bd[i] + 1] += 1
            for t in range(1, bits + 2):
                slot[t] += slot[t - 1]
            for i in range(c):
                p = slot[bd[i]]
                slot[bd[i]] = p + 1
                dist[q0 + s, p] = bd[i]
                idx[q0 + s, p] = bi[i]
        return 0

    return block


_TOPK_1, _TOPK_2, _TOPK_3, _TOPK_4, _TOPK_N = (_topk_kernel(nw) for nw in (1, 2, 3, 4, 0))


@njit
def topk_block(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws):
    """Exact top-k by (distance, index) of queries q0..q0+nb in one pass over the database; k <= ranking.SMALL_K.

    Each query keeps a buffer of candidates in index order and a bound: once k items sit at distance
    <= bound, a later item needs d < bound to enter (an equal one loses the tie on index). The bound
    tightens fast, so nearly every chunk of 64 rows holds no candidate for any query: four queries
    share each load of the chunk in a branch-free loop that finds the least distance of each, and
    only a query whose least lies below its bound takes the scalar path. `flat` is the database as
    one row of words. Returns 0, or minus the words of int64 scratch `ws` it needs when `ws` is smaller.
    """
    nw = qw.shape[1]
    if nw == 1:
        return _TOPK_1(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws)
    if nw == 2:
        return _TOPK_2(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws)
    if nw == 3:
        return _TOPK_3(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws)
    if nw == 4:
        return _TOPK_4(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws)
    return _TOPK_N(qw, dbw, flat, bits, k, q0, nb, dist, idx, ws)


@njit(cache=CACHE)
def _ap_block(qw, dbw, qlab, dblab, hist, kmax, grid, q0, nb, ap, found, at_grid):
    nwords = qw.shape[1]
    n = dbw.shape[0]
    nlab = qlab.shape[1]
    nbins = hist.shape[1]
    rows = max(64, TILE_WORDS // nwords)
    # nxt[qi, d] packs two counters: low 32 bits, the 0-based rank the next item at distance d takes;
    # high 32 bits, the same among relevant items. They start at the counts of smaller distances (a
    # counting sort), and one add of 1 + (relevant << 32) moves both: one read-modify-write per pair.
    nxt = np.zeros((nb, nbins), np.int64)
    cut = np.empty(nb, np.int64)
    total = np.empty(nbins, np.int64)
    pos_buf = np.empty(rows, np.int64)
    rank_buf = np.empty(rows, np.int64)
    grid_max = grid[-1] if grid.shape[0] else 0
    for qi in range(nb):
        h = hist[q0 + qi]
        n_all = 0
        n_rel = 0
        for d in range(nbins):
            nxt[qi, d] = n_all | (n_rel << 32)
            total[d] = h[d, 0] + h[d, 1]
            n_all += total[d]
            n_rel += h[d, 1]
        cut[qi] = _cutoff(total, kmax)[0]
    for t0 in range(0, n, rows):
        t1 = min(n, t0 + rows)
        tile = dbw[t0:t1]
        labs = dblab[t0:t1]
        for qi in range(nb):
            q = qw[q0 + qi]
            ql = qlab[q0 + qi]
            c = cut[qi]
            s = nxt[qi]
            cnt = 0  # branch-free filter: relevance is a coin flip the branch predictor can't learn
            for j in range(tile.shape[0]):
                d = _distance(q, tile, j, nwords)
                if d > c:
                    continue
                r = _overlap(ql, labs, j, nlab)
                packed = s[d]
                pos_buf[cnt] = (packed & 0xFFFFFFFF) + 1
                rank_buf[cnt] = (packed >> 32) + 1
                cnt += r
                s[d] = packed + 1 + (r << 32)
            acc = 0.0
            hits = 0
            for i in range(cnt):
                pos = pos_buf[i]
                if pos <= kmax:
                    acc += rank_buf[i] / pos
                    hits += 1
                    if pos <= grid_max:
                        at_grid[q0 + qi, np.searchsorted(grid, pos)] += 1
            ap[q0 + qi] += acc
            found[q0 + qi] += hits


@njit(parallel=True, cache=CACHE)
def index_order_ap(qw, dbw, qlab, dblab, hist, topk, grid):
    """AP per query with ties ordered by database index, from a relevance histogram (Q, bits+1, 2).

    topk <= 0 means the whole ranking. AP@K is normalised by the relevant items retrieved in the top K
    (the deep-hashing convention). Also returns the number of relevant items in the top K and how
    many relevant items sit within the top min(grid[g], K) ranks (for P@k / R@k curves).
    """
    nq = qw.shape[0]
    n = dbw.shape[0]
    kmax = n if topk <= 0 else min(topk, n)
    ap = np.zeros(nq, np.float64)
    found = np.zeros(nq, np.int64)
    at_grid = np.zeros((nq, grid.shape[0]), np.int64)
    for b in prange((nq + QUERY_BLOCK - 1) // QUERY_BLOCK):
        q0 = b * QUERY_BLOCK
        nb = min(nq, q0 + QUERY_BLOCK) - q0
        _ap_block(qw, dbw, qlab, dblab, hist, kmax, grid, q0, nb, ap, found, at_grid)
    for q in range(nq):
        if found[q] > 0:
            ap[q] /= found[q]
        for g in range(1, grid.shape[0]):
            at_grid[q, g] += at_grid[q, g - 1]
    return ap, found, at_grid


# One pass for histogram and index-order AP together. A relevant item's rank is (items at smaller
# distances) + (items at its own distance before it); only the second part is known during the pass,
# so each relevant item is buffered as (its within-distance position | distance << 40) and ranked
# once the histogram is complete. Four queries share each database row and keep four independent
# counter updates in flight, and a block of queries walks the database tile by tile: streamed whole
# for every four queries, codes and labels came from memory, not cache (measured 1.5x slower).
_POSITION = 0xFFFFFFFF
_DISTANCE_SHIFT = 40
FINISH_CHUNK = 1024  # items ranked per chunk by `_ranked_finish`: 8 KiB, kept in L1


@njit(cache=CACHE)
def ranked_block(qw, dbw, qlab, dblab, kmax, grid, q0, nb, hist, ap, found, at_grid, ws):
    """`relevance_histograms` and `index_order_ap` of queries q0..q0+nb in one pass over the database.

    The buffers, sized by a first pass counting the block's relevant items, come from the int64
    scratch `ws` (cut without reshape: it calls a Numba runtime helper the compiled library lacks).
    Returns 0, or minus the scratch it needs when `ws` is smaller (having written nothing).
    """
    n = dbw.shape[0]
    nbins = hist.shape[1]
    slots = 4 * ((nb + 3) // 4)  # padded queries repeat the block's last one; their results are dropped
    width = _most_relevant(qlab, q0, nb, dblab) + 1  # + 1: the last item's write, kept or not
    counters = slots * width
    need = counters + slots * (nbins + 1) + 4 * nbins + FINISH_CHUNK + 4 * 64
    if ws.shape[0] < need:
        return -need
    # cnt row s, d: items at distance d so far (low 32 bits) and relevant ones among them (high 32 bits)
    ws[counters : counters + slots * (nbins + 1)] = 0
    kept = ws[counters + slots * nbins : counters + slots * (nbins + 1)]
    scratch = ws[counters + slots * (nbins + 1) : need - 4 * 64]
    pairs = ws[need - 4 * 64 : need]
    rows = max(64, 2 * TILE_WORDS // (dbw.shape[1] + dblab.shape[1]))
    last = q0 + nb - 1
    for t0 in range(0, n, rows):
        t1 = min(n, t0 + rows)
        for s in range(0, slots, 4):
            c = counters + s * nbins
            _ranked_scan(qw[q0 + s], qw[min(q0 + s + 1, last)], qw[min(q0 + s + 2, last)], qw[min(q0 + s + 3, last)],
                         qlab[q0 + s], qlab[min(q0 + s + 1, last)], qlab[min(q0 + s + 2, last)], qlab[min(q0 + s + 3, last)],
                         dbw, dblab, t0, t1, ws[s * width : (s + 1) * width], ws[(s + 1) * width : (s + 2) * width],
                         ws[(s + 2) * width : (s + 3) * width], ws[(s + 3) * width : (s + 4) * width], ws[c : c + nbins],
                         ws[c + nbins : c + 2 * nbins], ws[c + 2 * nbins : c + 3 * nbins], ws[c + 3 * nbins : c + 4 * nbins],
                         kept[s : s + 4], pairs)  # fmt: skip
    for s in range(nb):
        c = counters + s * nbins
        _ranked_finish(ws[c : c + nbins], ws[s * width : s * width + kept[s]], q0 + s, kmax, grid, scratch, hist, ap, found, at_grid)
    return 0


def _pairs_kernel(nw: int, nl: int):
    """Distance (low 32 bits) and relevance (bit 32) of four queries against rows c0..c0+m, for codes
    of nw words and labels of nl words as compile-time constants (0: any number). With constants and
    the query words held in scalars the loop vectorises; the generic form stays scalar."""

    @njit(inline="always")
    def pair(q0, q1, l0, q, lab, dbw, dblab, u):
        if nw == 0:
            d = _distance(q, dbw, u, dbw.shape[1])
        else:
            d = _popcount(q0 ^ dbw[u, 0])
            if nw == 2:
                d += _popcount(q1 ^ dbw[u, 1])
        r = _overlap(lab, dblab, u, dblab.shape[1]) if nl == 0 else np.int64((l0 & dblab[u, 0]) != 0)
        return d | (r << 32)

    @njit(inline="always")
    def pairs_of(qa, qb, qc, qd, la, lb, lc, ld, dbw, dblab, c0, m, pairs):
        a0, a1, b0, b1 = qa[0], qa[min(1, qa.shape[0] - 1)], qb[0], qb[min(1, qb.shape[0] - 1)]
        c0_, c1, d0, d1 = qc[0], qc[min(1, qc.shape[0] - 1)], qd[0], qd[min(1, qd.shape[0] - 1)]
        ma, mb, mc, md = la[0], lb[0], lc[0], ld[0]
        for j in range(m):
            u = np.uint64(c0 + j)
            pairs[j] = pair(a0, a1, ma, qa, la, dbw, dblab, u)
            pairs[64 + j] = pair(b0, b1, mb, qb, lb, dbw, dblab, u)
            pairs[128 + j] = pair(c0_, c1, mc, qc, lc, dbw, dblab, u)
            pairs[192 + j] = pair(d0, d1, md, qd, ld, dbw, dblab, u)

    return pairs_of


_PAIRS_1, _PAIRS_2, _PAIRS_ANY = _pairs_kernel(1, 1), _pairs_kernel(2, 1), _pairs_kernel(0, 0)


@njit(cache=CACHE)
def _most_relevant(qlab, q0, nb, dblab):
    # The most database items any query of the block shares a label bit with. Four queries share
    # each pass over the labels (one pass per query came from memory: measured 2x slower); with one
    # label word the loop vectorises.
    n = dblab.shape[0]
    nlab = dblab.shape[1]
    last = q0 + nb - 1
    most = 0
    for s in range(q0, q0 + nb, 4):
        la, lb, lc, ld = qlab[s], qlab[min(s + 1, last)], qlab[min(s + 2, last)], qlab[min(s + 3, last)]
        ca = cb = cc = cd = 0
        if nlab == 1:
            wa, wb, wc, wd = la[0], lb[0], lc[0], ld[0]
            for j in range(n):
                x = dblab[np.uint64(j), 0]
                ca += (wa & x) != 0
                cb += (wb & x) != 0
                cc += (wc & x) != 0
                cd += (wd & x) != 0
        else:
            for j in range(n):
                ca += _overlap(la, dblab, j, nlab)
                cb += _overlap(lb, dblab, j, nlab)
                cc += _overlap(lc, dblab, j, nlab)
                cd += _overlap(ld, dblab, j, nlab)
        most = max(most, ca, cb, cc, cd)
    return most


@njit(cache=CACHE)
def _ranked_scan(qa, qb, qc, qd, la, lb, lc, ld, dbw, dblab, t0, t1, ba, bb, bc, bd, sa, sb, sc, sd, kept, pairs):
    nwords = qa.shape[0]
    nlab = la.shape[0]
    na, nb, nc, nd = kept[0], kept[1], kept[2], kept[3]
    for c0 in range(t0, t1, 64):
        m = min(t1, c0 + 64) - c0
        # The pairs 64 rows at a time in a vectorised loop, then the counting, scalar (measured
        # 1.3x faster than both in one loop).
        if nwords == 1 and nlab == 1:
            _PAIRS_1(qa, qb, qc, qd, la, lb, lc, ld, dbw, dblab, c0, m, pairs)
        elif nwords == 2 and nlab == 1:
            _PAIRS_2(qa, qb, qc, qd, la, lb, lc, ld, dbw, dblab, c0, m, pairs)
        else:
            _PAIRS_ANY(qa, qb, qc, qd, la, lb, lc, ld, dbw, dblab, c0, m, pairs)
        for j in range(m):
            va, vb, vc, vd = pairs[j], pairs[64 + j], pairs[128 + j], pairs[192 + j]
            xa, xb, xc, xd = va & _POSITION, vb & _POSITION, vc & _POSITION, vd & _POSITION
            ka, kb, kc, kd = sa[xa], sb[xb], sc[xc], sd[xd]
            # Written for every item, kept (the count moves on) only for relevant ones: no branch.
            ba[na] = (ka & _POSITION) | (xa << _DISTANCE_SHIFT)
            bb[nb] = (kb & _POSITION) | (xb << _DISTANCE_SHIFT)
            bc[nc] = (kc & _POSITION) | (xc << _DISTANCE_SHIFT)
            bd[nd] = (kd & _POSITION) | (xd << _DISTANCE_SHIFT)
            na += va >> 32
            nb += vb >> 32
            nc += vc >> 32
            nd += vd >> 32
            sa[xa] = ka + 1 + ((va >> 32) << 32)
            sb[xb] = kb + 1 + ((vb >> 32) << 32)
            sc[xc] = kc + 1 + ((vc >> 32) << 32)
            sd[xd] = kd + 1 + ((vd >> 32) << 32)
    kept[0], kept[1], kept[2], kept[3] = na, nb, nc, nd


@njit(cache=CACHE, fastmath={"reassoc"}, error_model="numpy")
def _ranked_finish(cnt, buf, q, kmax, grid, scratch, hist, ap, found, at_grid):
    # The histogram is complete: rank the buffered relevant items of query q.
    nbins = cnt.shape[0]
    ngrid = grid.shape[0]
    # nxt[d]: (position of the next item at distance d) | (rank of the next relevant one there) << 32,
    # so an item's (position | rank << 32) is one lookup and one add, and the next relevant item's rank
    # one add to the same word (two tables and a count per distance: measured 1.10-1.13x slower on
    # code-correlated multi-hot labels, where a query has half the database to rank).
    # at_grid[q, g] counts relevant items up to position P_g = min(grid[g], K). The cuts whose P_g
    # falls inside group d (the items at distance d) are gi[d]..ge[d]; watch[d] is the next of them
    # not yet passed. The count at a cut is fixed by the first relevant item past it, so most items
    # only compare their position with watch[d].
    nxt, gi, ge, watch = scratch[:nbins], scratch[nbins : 2 * nbins], scratch[2 * nbins : 3 * nbins], scratch[3 * nbins : 4 * nbins]
    n_all = 0
    n_rel = 0
    g = 0
    for d in range(nbins):
        rel = cnt[d] >> 32
        items = cnt[d] & _POSITION
        hist[q, d, 0] = items - rel
        hist[q, d, 1] = rel
        nxt[d] = (n_all + 1) | ((n_rel + 1) << 32)
        gi[d] = g
        while g < ngrid and min(grid[g], kmax) <= n_all + items:
            g += 1
        ge[d] = g
        watch[d] = min(grid[gi[d]], kmax) if gi[d] < g else _NEVER
        n_all += items
        n_rel += rel
    hits = 0
    acc = 0.0
    # Items a chunk at a time: (position | rank << 32) into a chunk that stays in L1, then summed. The
    # divisions in a loop of their own vectorise, with the sum reassociated (it changes the last bits
    # of the AP, not its exactness against a reference to 1e-12) and NumPy's error model (Python's
    # raises on a zero divisor: a branch per item that kept the loop scalar). Measured 1.07-1.15x.
    chunk = scratch[4 * nbins :]
    for e0 in range(0, buf.shape[0], chunk.shape[0]):
        m = min(buf.shape[0], e0 + chunk.shape[0]) - e0
        for e in range(m):
            v = buf[e0 + e]
            d = np.uint64(v >> _DISTANCE_SHIFT)  # unsigned: no negative-index fix-up on its lookups
            at = nxt[d]
            nxt[d] = at + (np.int64(1) << 32)  # buffered in database order: the next one ranks after it
            x = at + (v & _POSITION)
            pos = x & _POSITION
            if pos > watch[d]:  # the first relevant item past one or more cuts of its group
                c = gi[d]
                while c < ge[d] and min(grid[c], kmax) < pos:
                    at_grid[q, c] = (x >> 32) - 1
                    c += 1
                gi[d] = c
                watch[d] = min(grid[c], kmax) if c < ge[d] else _NEVER
            chunk[e] = x
        for e in range(m):
            pos = chunk[e] & _POSITION
            kept = pos <= kmax  # an item past K adds nothing
            hits += kept
            acc += (chunk[e] >> 32) / pos if kept else 0.0
    for d in range(nbins):  # cuts no relevant item went past: every relevant item of the group is in
        for c in range(gi[d], ge[d]):
            at_grid[q, c] = (nxt[d] >> 32) - 1
    ap[q] = acc / hits if hits else 0.0
    found[q] = hits


_NEVER = 1 << 62  # a position past every database


# Groups up to this size are summed term by term; larger ones through harmonic numbers, so the pass
# costs O(distances) per query instead of O(database).
_DIRECT_GROUP = 64


@njit(inline="always")
def _harmonic_tail(m):
    # H(m) - ln(m) - Euler's gamma, asymptotically (m > _DIRECT_GROUP: the next term is < 1e-16).
    x = float(m)
    inv2 = 1.0 / (x * x)
    return 0.5 / x - inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 / 252.0))


@njit(cache=CACHE)
def _harmonic_gap(before, n):
    """H(before + n) - H(before) = sum of 1 / (before + j) for j = 1..n, for n > _DIRECT_GROUP."""
    top = before + n
    if before > _DIRECT_GROUP:
        return math.log1p(n / before) + _harmonic_tail(top) - _harmonic_tail(before)
    head = 0.0
    for j in range(1, int(before) + 1):
        head += 1.0 / j
    return math.log(top) + 0.5772156649015329 + _harmonic_tail(top) - head


@njit(cache=CACHE, fastmath={"reassoc", "contract"})
def tie_aware_block(hist, q0, nb, mean, best, worst):
    """Tie-aware AP (He et al., CVPR 2018) and its best/worst bounds from (Q, bits+1, 2) histograms.

    Within a group of n items at one distance holding r relevant ones, after N items and R relevant
    ones at smaller distances: position j is relevant with probability r/n, and given that, holds
    (j-1)(r-1)/(n-1) relevant items before it in expectation. So the group adds
        r/n * sum_j (R + 1 + (j-1)(r-1)/(n-1)) / (N + j).
    Best case puts the group's relevant items first, worst case last.
    """
    nbins = hist.shape[1]
    for q in range(q0, q0 + nb):
        mean[q] = best[q] = worst[q] = 0.0
        before = 0.0
        rel_before = 0.0
        total_rel = 0
        for d in range(nbins):
            total_rel += hist[q, d, 1]
        if total_rel == 0:
            continue
        sm = 0.0
        sb = 0.0
        sw = 0.0
        for d in range(nbins):
            r = hist[q, d, 1]
            n = hist[q, d, 0] + r
            if r > 0:
                slope = (r - 1.0) / (n - 1.0) if n > 1 else 0.0
                if n <= _DIRECT_GROUP:
                    acc = 0.0
                    for j in range(1, n + 1):
                        acc += (rel_before + 1.0 + (j - 1.0) * slope) / (before + j)
                else:  # the same sum: numerator (R + 1 - slope (1 + N)) + slope (N + j)
                    acc = (rel_before + 1.0 - slope * (1.0 + before)) * _harmonic_gap(before, n) + slope * n
                sm += acc * r / n
                if r <= _DIRECT_GROUP:
                    for i in range(1, r + 1):
                        sb += (rel_before + i) / (before + i)
                        sw += (rel_before + i) / (before + n - r + i)
                else:  # (R + i) / (M + i) = 1 + (R - M) / (M + i)
                    sb += r + (rel_before - before) * _harmonic_gap(before, r)
                    sw += r + (rel_before - (before + n - r)) * _harmonic_gap(before + n - r, r)
            before += n
            rel_before += r
        mean[q] = sm / total_rel
        best[q] = sb / total_rel
        worst[q] = sw / total_rel
    return 0
