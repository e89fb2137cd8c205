"""The ranking kernels (compiled library and Numba's own) against brute force on hypothesis-generated
codes with many ties."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import code_sets
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from dsah_rt import hamming, native, ranking
from dsah_rt.codes import pack
from dsah_rt.popcount_numpy import words
from dsah_rt.index import BinaryIndex


def _words(x01: np.ndarray) -> np.ndarray:
    return words(pack(x01))


@given(code_sets())
def test_distance_histograms_match_brute_force(case):
    k, q01, db01, _, _ = case
    hist = hamming.distance_histograms(_words(q01), _words(db01), k)
    dist = ref.distances(q01, db01)
    expected = np.stack([np.bincount(row, minlength=k + 1) for row in dist])
    np.testing.assert_array_equal(hist, expected)


@given(code_sets())
def test_relevance_histograms_split_counts_by_relevance(case):
    k, q01, db01, qlab, dblab = case
    qlw, dlw = ranking.label_words(qlab, dblab)
    hist = hamming.relevance_histograms(_words(q01), _words(db01), qlw, dlw, k)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    for i in range(len(q01)):
        np.testing.assert_array_equal(hist[i, :, 1], np.bincount(dist[i][rel[i]], minlength=k + 1))
        np.testing.assert_array_equal(hist[i, :, 0], np.bincount(dist[i][~rel[i]], minlength=k + 1))


@given(code_sets(), st.data())
def test_topk_is_stable_ranking_prefix(case, data):
    k, q01, db01, _, _ = case
    K = data.draw(st.integers(1, len(db01)))
    index = BinaryIndex(k)
    index.add(pack(db01))
    D, I = index.search(pack(q01), K)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    assert D.dtype == np.int32 and I.dtype == np.int64
    # The compiled kernel itself, whichever route the index took for this small case.
    D, I = ranking.topk(_words(q01), _words(db01), k, K)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))


@given(st.sampled_from([1, 63, 64, 65, 130, 192, 256, 257, 600]), st.data())
def test_topk_at_every_word_count(bits, data):
    # 1-4 words take their own compiled path and more take the generic one; a few prototypes make
    # ties at every distance, and k up to the database size makes the candidate buffers compact.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n = data.draw(st.integers(1, 3000))
    protos = rng.integers(0, 2, (3, bits), dtype=np.uint8)
    db01 = protos[rng.integers(0, 3, n)] ^ (rng.random((n, bits)) < 0.02).astype(np.uint8)
    q01 = protos[rng.integers(0, 3, data.draw(st.integers(1, 9)))]
    K = data.draw(st.integers(1, min(n, 300)))
    D, I = ranking.topk(_words(q01), _words(db01), bits, K)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))


@pytest.mark.parametrize("bits", [48, 128, 200, 256])
def test_kernels_across_many_tiles(bits):
    # Databases spanning several tiles (4,096 words each) with heavy ties, 1-4 words a code, odd
    # query counts: the tile and four-query boundaries of top-k and of the one-pass AP.
    rng = np.random.default_rng(bits)
    protos = rng.integers(0, 2, (4, bits), dtype=np.uint8)
    lab = rng.integers(0, 3, 9000)
    db01 = protos[lab] ^ (rng.random((9000, bits)) < 0.03).astype(np.uint8)
    q01, qlab = db01[:13] ^ (rng.random((13, bits)) < 0.05).astype(np.uint8), lab[:13]
    qw, dw = _words(q01), _words(db01)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, lab)
    D, I = ranking.topk(qw, dw, bits, 700)
    ref.assert_ranking_prefix(D, I, dist)
    qlw, dlw = ranking.label_words(qlab, lab)
    _, ap, _, _ = ranking.index_order(qw, dw, qlw, dlw, bits, 0, np.zeros(0, np.int64))
    for i in range(len(q01)):
        ref.assert_close(ap[i], ref.average_precision(rel[i][ref.ranking(dist[i])], None))


def test_index_order_ap_past_one_finish_chunk():
    # Several chunks of `_ranked_finish` per query (about half the items relevant), with cut-offs
    # at the chunks' edges and a top K that ends inside the second chunk.
    rng = np.random.default_rng(5)
    n = 5 * hamming.FINISH_CHUNK + 17
    db01, q01 = rng.integers(0, 2, (n, 10), dtype=np.uint8), rng.integers(0, 2, (3, 10), dtype=np.uint8)
    qlab, dblab = rng.integers(0, 2, 3), rng.integers(0, 2, n)
    qlw, dlw = ranking.label_words(qlab, dblab)
    chunk = hamming.FINISH_CHUNK
    grid = np.array([1, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, n], np.int64)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    for topk in (0, chunk + 3):
        _, ap, found, at_grid = ranking.index_order(_words(q01), _words(db01), qlw, dlw, 10, topk, grid)
        for i in range(len(q01)):
            ranked = rel[i][ref.ranking(dist[i])]
            assert ranked.sum() > 2 * chunk
            ref.assert_close(ap[i], ref.average_precision(ranked, topk or None))
            assert found[i] == ranked[: topk or None].sum()
            np.testing.assert_array_equal(at_grid[i], [ranked[: min(g, topk or g)].sum() for g in grid])


def test_full_ranking_equals_stable_sort_with_heavy_ties():
    rng = np.random.default_rng(3)
    db01 = rng.integers(0, 2, (5000, 12), dtype=np.uint8)  # 12 bits: every distance is shared
    q01 = rng.integers(0, 2, (7, 12), dtype=np.uint8)
    index = BinaryIndex(12)
    index.add(pack(db01))
    D, I = index.search(pack(q01), len(db01))
    dist = ref.distances(q01, db01)
    for i in range(len(q01)):
        np.testing.assert_array_equal(I[i], ref.ranking(dist[i]))


@pytest.mark.parametrize("budget", [ranking.FUSED_BUFFER_BYTES, 0], ids=["one-pass", "two-pass"])
@given(case=code_sets(), topk=st.sampled_from([0, 1, 3, 10]))
def test_index_order_ap_matches_loop(case, topk, budget):
    k, q01, db01, qlab, dblab = case
    qw, dw = _words(q01), _words(db01)
    qlw, dlw = ranking.label_words(qlab, dblab)
    grid = np.array([1, 2, 5, 7, 1000], np.int64)
    hist, ap, found, at_grid = ranking.index_order(qw, dw, qlw, dlw, k, topk, grid, budget=budget)
    np.testing.assert_array_equal(hist, hamming.relevance_histograms(qw, dw, qlw, dlw, k))
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    for i in range(len(q01)):
        ranked = rel[i][ref.ranking(dist[i])]
        ref.assert_close(ap[i], ref.average_precision(ranked, topk or None))
        assert found[i] == ranked[: topk or None].sum()
        np.testing.assert_array_equal(at_grid[i], [ranked[: min(g, topk or g)].sum() for g in grid])


def _tie_aware(case):
    k, q01, db01, qlab, dblab = case
    qlw, dlw = ranking.label_words(qlab, dblab)
    hist = hamming.relevance_histograms(_words(q01), _words(db01), qlw, dlw, k)
    return (*ranking.tie_aware_ap(hist), ref.distances(q01, db01), ref.relevance(qlab, dblab))


@given(code_sets(max_db=7))
def test_tie_aware_ap_is_mean_over_all_tie_orderings(case):
    mean, best, worst, dist, rel = _tie_aware(case)
    for i in range(len(dist)):
        if not rel[i].any():
            assert mean[i] == best[i] == worst[i] == 0.0
            continue
        m, hi, lo = ref.tie_orderings_ap(dist[i], rel[i])
        ref.assert_close(mean[i], m, 1e-12)
        ref.assert_close(best[i], hi, 1e-12)
        ref.assert_close(worst[i], lo, 1e-12)


@given(code_sets(max_db=400))
def test_tie_aware_ap_matches_closed_form_on_larger_groups(case):
    mean, best, worst, dist, rel = _tie_aware(case)
    for i in range(len(dist)):
        ref.assert_close(mean[i], ref.tie_aware_formula(dist[i], rel[i]), 1e-10)
        assert worst[i] - 1e-12 <= mean[i] <= best[i] + 1e-12


@pytest.mark.parametrize("bits", [8, 16])
def test_tie_aware_ap_on_groups_of_thousands(bits):
    # Groups beyond the term-by-term size take the harmonic-number route; the reference sums per item.
    rng = np.random.default_rng(bits)
    db01 = rng.integers(0, 2, (20_000, bits), dtype=np.uint8)
    q01 = rng.integers(0, 2, (6, bits), dtype=np.uint8)
    qlab, dblab = rng.integers(0, 3, 6), np.where(rng.random(20_000) < 0.97, rng.integers(0, 3, 20_000), 5)
    qlw, dlw = ranking.label_words(qlab, dblab)
    hist = hamming.relevance_histograms(_words(q01), _words(db01), qlw, dlw, bits)
    assert hist.sum(axis=2).max() > 1000 and hist[:, :, 1].max() > 100
    mean, best, worst = ranking.tie_aware_ap(hist)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    for i in range(len(q01)):
        ref.assert_close(mean[i], ref.tie_aware_formula(dist[i], rel[i]), 1e-12)
        order = np.lexsort((~rel[i], dist[i]))  # relevant first within each distance: the best case
        ref.assert_close(best[i], ref.average_precision(rel[i][order]), 1e-12)
        order = np.lexsort((rel[i], dist[i]))
        ref.assert_close(worst[i], ref.average_precision(rel[i][order]), 1e-12)


def test_multi_label_words_beyond_64_classes():
    rng = np.random.default_rng(0)
    qlab = (rng.random((5, 150)) < 0.01).astype(np.uint8)
    dblab = (rng.random((300, 150)) < 0.01).astype(np.uint8)
    qlw, dlw = ranking.label_words(qlab, dblab)
    assert qlw.shape[1] == 3
    q01 = rng.integers(0, 2, (5, 24), dtype=np.uint8)
    db01 = rng.integers(0, 2, (300, 24), dtype=np.uint8)
    hist = hamming.relevance_histograms(_words(q01), _words(db01), qlw, dlw, 24)
    np.testing.assert_array_equal(hist[:, :, 1].sum(1), ref.relevance(qlab, dblab).sum(1))


def test_sparse_large_class_ids_are_compared_by_equality():
    qlab = np.array([10**9, 7, 3])
    dblab = np.array([7, 10**9, 10**9, 2])
    qlw, dlw = ranking.label_words(qlab, dblab)
    q01 = np.zeros((3, 8), np.uint8)
    hist = hamming.relevance_histograms(_words(q01), _words(np.zeros((4, 8), np.uint8)), qlw, dlw, 8)
    np.testing.assert_array_equal(hist[:, 0, 1], [2, 1, 0])


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_thread_count(threads):
    rng = np.random.default_rng(1)
    q01 = rng.integers(0, 2, (37, 48), dtype=np.uint8)
    db01 = rng.integers(0, 2, (3000, 48), dtype=np.uint8)
    before = native.set_threads(None)
    try:
        native.set_threads(threads)
        index = BinaryIndex(48)
        index.add(pack(db01))
        D, I = index.search(pack(q01), 50)
    finally:
        native.set_threads(before)
    dist = ref.distances(q01, db01)
    np.testing.assert_array_equal(I, np.stack([ref.ranking(r)[:50] for r in dist]))


@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("bits", [64, 256, 320])
def test_topk_bound_from_a_sample(adversarial, bits):
    # k >= SAMPLE_MIN_K starts from a bound read off every (k // 32)-th row. Adversarial: exactly
    # those rows equal the query, so the sample promises far more close items than exist and the
    # block must run again from a loose bound. 1 and 4 words a code take their own compiled paths
    # (at 4 the sweep keeps its distances for the candidate path), 5 the generic one.
    rng = np.random.default_rng(bits)
    k, n = (4096, 64 * 4096) if adversarial else (300, 30_000)
    protos = rng.integers(0, 2, (5, bits), dtype=np.uint8)
    db01 = protos[rng.integers(0, 5, n)] ^ (rng.random((n, bits)) < 0.2).astype(np.uint8)
    q01 = protos[rng.integers(0, 5, 5)] ^ (rng.random((5, bits)) < 0.05).astype(np.uint8)
    if adversarial:
        q01 = q01[:1]
        db01[:: k // 32] = q01[0]
    assert k >= hamming.SAMPLE_MIN_K
    D, I = ranking.topk(_words(q01), _words(db01), bits, k)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
