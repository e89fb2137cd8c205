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
from numba import njit, prange, types
from numba.extending import intrinsic

from dsah_rt.numba_cache import kernel_cache, skip_blas_probe
from dsah_rt.popcount_numpy import words  # noqa: F401 - the kernels' input layout, re-exported

CACHE = kernel_cache(__file__)
skip_blas_probe()

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


@njit(inline="always")
def _distance(q, tile, j, nwords):
    # Codes up to 128 bits (48 included) take loop-free paths; a loop over words here gets vectorised
    # into an emulated vector popcount that is several times slower for short rows.
    if nwords == 1:
        return _popcount(q[0] ^ tile[j, 0])
    if nwords == 2:
        return _popcount(q[0] ^ tile[j, 0]) + _popcount(q[1] ^ tile[j, 1])
    d = 0
    for w in range(nwords):
        d += _popcount(q[w] ^ tile[j, w])
    return d


@njit(inline="always")
def _overlap(qlab, dblab, j, nlab):
    # Multi-hot words: relevant if any label is shared. 0/1 integer without data-dependent branches.
    if nlab == 1:
        return np.int64((qlab[0] & dblab[j, 0]) != 0)
    acc = np.uint64(0)
    for w in range(nlab):
        acc |= qlab[w] & dblab[j, w]
    return np.int64(acc != 0)


def label_words(query_labels: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as multi-hot uint64 words for the kernels: relevant iff the words share a set bit.

    Class ids become one-hot over the ids that occur (so relevance is plain equality, and one word
    holds up to 64 classes); multi-hot rows are packed as they are.
    """
    query_labels, db_labels = np.asarray(query_labels), np.asarray(db_labels)
    if query_labels.ndim == 1:
        ids, inverse = np.unique(np.concatenate([query_labels, db_labels]), return_inverse=True)
        onehot = np.zeros((len(inverse), len(ids)), np.uint8)
        onehot[np.arange(len(inverse)), inverse] = 1
        query_labels, db_labels = onehot[: len(query_labels)], onehot[len(query_labels) :]
    pack_ = lambda lab: words(np.packbits(lab.astype(np.uint8), axis=1))  # noqa: E731
    return pack_(query_labels), pack_(db_labels)


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


SMALL_K = 4096  # above this, top-k takes the two-pass histogram route (its memory does not grow with k)


@njit(cache=CACHE)
def _bound(hist, k):
    """Smallest distance t with at least k items at distance <= t (len(hist) if there is none)."""
    seen = 0
    for t in range(hist.shape[0]):
        seen += hist[t]
        if seen >= k:
            return t
    return hist.shape[0]


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


@njit(cache=CACHE)
def _small_topk_block(qw, dbw, bits, k, q0, nb, dist, idx):
    # One pass. Each query keeps a buffer of candidates in index order and a bound: once k items
    # sit at distance <= bound, a later item needs d < bound to enter (an equal one loses the tie on
    # index). The bound tightens fast, so nearly every chunk of 64 distances holds no candidate: the
    # distances and the "any below the bound?" test are branch-free loops the compiler vectorises,
    # and only chunks with a candidate take the scalar path.
    nwords = qw.shape[1]
    n = dbw.shape[0]
    rows = max(64, TILE_WORDS // nwords)
    cap = 2 * k + 16
    bd = np.empty((nb, cap), np.int32)
    bi = np.empty((nb, cap), np.int64)
    hist = np.zeros((nb, bits + 1), np.int64)
    count = np.zeros(nb, np.int64)
    bound = np.full(nb, bits + 1, np.int64)  # accept d < bound; bits + 1 accepts everything
    dbuf = np.empty(rows, np.int32)  # int32: twice the lanes per vector of int64 (measured 7% faster)
    # Codes of 2+ words: the tile transposed once per block (word-major), so each word's pass over
    # it is a contiguous loop that vectorises; row-major, the popcounts measured 2.3-2.6x slower.
    columns = np.empty((nwords, rows), np.uint64)
    for t0 in range(0, n, rows):
        tile = dbw[t0 : min(n, t0 + rows)]
        m = tile.shape[0]
        if nwords > 1:
            for j in range(m):
                for w in range(nwords):
                    columns[w, j] = tile[j, w]
        for qi in range(nb):
            q = qw[q0 + qi]
            if nwords == 1:
                for j in range(m):
                    dbuf[j] = _popcount(q[0] ^ tile[j, 0])
            else:
                first, q_first = columns[0], q[0]
                for j in range(m):
                    dbuf[j] = _popcount(q_first ^ first[j])
                for w in range(1, nwords):
                    column, q_word = columns[w], q[w]
                    for j in range(m):
                        dbuf[j] += _popcount(q_word ^ column[j])
            b = bound[qi]
            c = count[qi]
            for c0 in range(0, m, 64):
                chunk = dbuf[c0 : min(m, c0 + 64)]
                below = 0
                for d in chunk:
                    below += d < b
                if below == 0:
                    continue
                for j in range(chunk.shape[0]):
                    d = chunk[j]
                    if d < b:
                        if c == cap:
                            c = _compact(bd[qi], bi[qi], c, hist[qi], b, k)
                        bd[qi, c] = d
                        bi[qi, c] = t0 + c0 + j
                        c += 1
                        hist[qi, d] += 1
                        b = min(b, _bound(hist[qi], k))
            bound[qi] = b
            count[qi] = c
    for qi in range(nb):
        c = _compact(bd[qi], bi[qi], count[qi], hist[qi], bound[qi], k)
        # Counting sort of the k survivors by distance; stable, so ties stay in index order.
        slot = np.zeros(bits + 2, np.int64)
        for i in range(c):
            slot[bd[qi, i] + 1] += 1
        for t in range(1, bits + 2):
            slot[t] += slot[t - 1]
        for i in range(c):
            p = slot[bd[qi, i]]
            slot[bd[qi, i]] = p + 1
            dist[q0 + qi, p] = bd[qi, i]
            idx[q0 + qi, p] = bi[qi, i]


@njit(parallel=True, cache=CACHE)
def small_topk(qw, dbw, bits, k):
    """Exact top-k by (distance, index) in one pass over the database, for k <= SMALL_K."""
    nq = qw.shape[0]
    dist = np.empty((nq, k), np.int32)
    idx = np.empty((nq, k), np.int64)
    for b in prange((nq + QUERY_BLOCK - 1) // QUERY_BLOCK):
        q0 = b * QUERY_BLOCK
        _small_topk_block(qw, dbw, bits, k, q0, min(nq, q0 + QUERY_BLOCK) - q0, dist, idx)
    return dist, idx


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
# counter updates in flight. The buffers hold every relevant item of four queries per thread.
_POSITION = 0xFFFFFFFF
_DISTANCE_SHIFT = 40
FUSED_BUFFER_BYTES = 1 << 30  # above this (threads x 4 x most relevant items x 8 B), the two-pass route


@njit(cache=CACHE)
def _ranked_group(qw, dbw, qlab, dblab, q0, nb, kmax, grid, buf, hist, ap, found, at_grid):
    nq, nwords = qw.shape
    nlab = qlab.shape[1]
    nbins = hist.shape[1]
    # cnt[i, d]: items at distance d so far (low 32 bits) and relevant ones among them (high 32 bits).
    cnt = np.zeros((4, nbins), np.int64)
    qa, qb, qc, qd = qw[q0], qw[min(q0 + 1, nq - 1)], qw[min(q0 + 2, nq - 1)], qw[min(q0 + 3, nq - 1)]
    la, lb, lc, ld = qlab[q0], qlab[min(q0 + 1, nq - 1)], qlab[min(q0 + 2, nq - 1)], qlab[min(q0 + 3, nq - 1)]
    sa, sb, sc, sd = cnt[0], cnt[1], cnt[2], cnt[3]
    ba, bb, bc, bd = buf[0], buf[1], buf[2], buf[3]
    na = nb_ = nc = nd = 0
    for j in range(dbw.shape[0]):
        xa = _distance(qa, dbw, j, nwords)
        xb = _distance(qb, dbw, j, nwords)
        xc = _distance(qc, dbw, j, nwords)
        xd = _distance(qd, dbw, j, nwords)
        wa = _overlap(la, dblab, j, nlab)
        wb = _overlap(lb, dblab, j, nlab)
        wc = _overlap(lc, dblab, j, nlab)
        wd = _overlap(ld, dblab, j, nlab)
        ka, kb, kc, kd = sa[xa], sb[xb], sc[xc], sd[xd]
        # Written for every item, kept (the count moves on) only for relevant ones: no branch.
        ba[na] = (ka & _POSITION) | (xa << _DISTANCE_SHIFT)
        bb[nb_] = (kb & _POSITION) | (xb << _DISTANCE_SHIFT)
        bc[nc] = (kc & _POSITION) | (xc << _DISTANCE_SHIFT)
        bd[nd] = (kd & _POSITION) | (xd << _DISTANCE_SHIFT)
        na += wa
        nb_ += wb
        nc += wc
        nd += wd
        sa[xa] = ka + 1 + (wa << 32)
        sb[xb] = kb + 1 + (wb << 32)
        sc[xc] = kc + 1 + (wc << 32)
        sd[xd] = kd + 1 + (wd << 32)
    kept = (na, nb_, nc, nd)
    grid_max = grid[-1] if grid.shape[0] else 0
    before_all = np.empty(nbins, np.int64)
    before_rel = np.empty(nbins, np.int64)
    seen = np.zeros(nbins, np.int64)
    # The grid cut-offs an item at distance d can fall below lie in [first_cut[d], last_cut[d]]: one
    # value for most distances, so most items find theirs without a search.
    first_cut = np.empty(nbins, np.int64)
    last_cut = np.empty(nbins, np.int64)
    for i in range(nb):
        q = q0 + i
        n_all = 0
        n_rel = 0
        for d in range(nbins):
            rel = cnt[i, d] >> 32
            items = cnt[i, d] & _POSITION
            hist[q, d, 0] = items - rel
            hist[q, d, 1] = rel
            before_all[d] = n_all
            before_rel[d] = n_rel
            seen[d] = 0
            first_cut[d] = np.searchsorted(grid, n_all + 1)
            last_cut[d] = np.searchsorted(grid, n_all + items)
            n_all += items
            n_rel += rel
        acc = 0.0
        hits = 0
        for e in range(kept[i]):
            v = buf[i, e]
            d = v >> _DISTANCE_SHIFT
            pos = before_all[d] + (v & _POSITION) + 1
            rank = before_rel[d] + seen[d] + 1  # buffered in database order: seen[d] relevant ones before it
            seen[d] += 1
            if pos <= kmax:
                acc += rank / pos
                hits += 1
                if pos <= grid_max:
                    cut = first_cut[d]
                    if cut != last_cut[d]:
                        while grid[cut] < pos:
                            cut += 1
                    at_grid[q, cut] += 1
        ap[q] = acc / hits if hits else 0.0
        found[q] = hits


@njit(parallel=True, cache=CACHE)
def ranked_relevance(qw, dbw, qlab, dblab, bits, topk, grid, most_relevant):
    """`relevance_histograms` and `index_order_ap` in one pass over the database (same results).

    `most_relevant` bounds any query's relevant items (it sizes the buffers).
    """
    nq = qw.shape[0]
    kmax = dbw.shape[0] if topk <= 0 else min(topk, dbw.shape[0])
    hist = np.zeros((nq, bits + 1, 2), np.int64)
    ap = np.zeros(nq, np.float64)
    found = np.zeros(nq, np.int64)
    at_grid = np.zeros((nq, grid.shape[0]), np.int64)
    for g in prange((nq + 3) // 4):
        q0 = 4 * g
        buf = np.empty((4, most_relevant + 1), np.int64)  # + 1: the last item's write, kept or not
        _ranked_group(qw, dbw, qlab, dblab, q0, min(nq, q0 + 4) - q0, kmax, grid, buf, hist, ap, found, at_grid)
    for q in range(nq):
        for i in range(1, grid.shape[0]):
            at_grid[q, i] += at_grid[q, i - 1]
    return hist, ap, found, at_grid


def most_relevant(qlab: np.ndarray, dblab: np.ndarray) -> int:
    """The largest number of database items any query shares a label word bit with."""
    if dblab.shape[1] == 1:  # one word: a plain sort (rows as void bytes sort 3x slower)
        patterns, counts = np.unique(dblab[:, 0], return_counts=True)
        patterns = patterns[:, None]
    else:
        rows = np.ascontiguousarray(dblab).view(np.dtype((np.void, dblab.itemsize * dblab.shape[1]))).ravel()
        patterns, counts = np.unique(rows, return_counts=True)
        patterns = patterns.view(np.uint64).reshape(len(patterns), dblab.shape[1])
    best = 0
    step = max(1, (1 << 24) // patterns.size)  # queries per chunk: temporaries of at most 2^24 words
    for start in range(0, len(qlab), step):
        share = (qlab[start : start + step, None, :] & patterns[None]).any(axis=2)
        best = max(best, int((share @ counts).max(initial=0)))
    return best


def index_order(qw, dbw, qlab, dblab, bits, topk, grid, budget=FUSED_BUFFER_BYTES):
    """(histograms, AP, relevant found, relevant within the grid) of `ranked_relevance`, taking the
    two-pass route (relevance histograms, then `index_order_ap`) when its buffers would exceed `budget`."""
    most = most_relevant(qlab, dblab)
    if numba.get_num_threads() * 4 * (most + 1) * 8 <= budget:
        return ranked_relevance(qw, dbw, qlab, dblab, bits, topk, grid, most)
    hist = relevance_histograms(qw, dbw, qlab, dblab, bits)
    return (hist, *index_order_ap(qw, dbw, qlab, dblab, hist, topk, grid))


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


@njit(parallel=True, cache=CACHE, fastmath={"reassoc", "contract"})
def tie_aware_ap(hist):
    """Tie-aware AP (He et al., CVPR 2018) and its best/worst bounds from (Q, bits+1, 2) histograms.

    Within a group of n items at one distance holding r relevant ones, after N items and R relevant
    ones at smaller distances: position j is relevant with probability r/n, and given that, holds
    (j-1)(r-1)/(n-1) relevant items before it in expectation. So the group adds
        r/n * sum_j (R + 1 + (j-1)(r-1)/(n-1)) / (N + j).
    Best case puts the group's relevant items first, worst case last.
    """
    nq = hist.shape[0]
    nbins = hist.shape[1]
    mean = np.zeros(nq, np.float64)
    best = np.zeros(nq, np.float64)
    worst = np.zeros(nq, np.float64)
    for q in prange(nq):
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
    return mean, best, worst


def set_threads(n: int | None) -> int:
    """Use n threads (None: all cores); returns the number in effect."""
    if n is not None:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return numba.get_num_threads()
