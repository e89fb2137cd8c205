"""MIHIndex against brute force (unpacked bits, stable sort by (distance, index)) on codes with many ties
and duplicates: its own probing alone (scan_cost = 0), mixed with the linear-scan fallback, the
stopping rule at the exact step where it must not stop early, files and the command line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import code_sets
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cli_checks import assert_one_line_error
from dsah_rt.cli import main
from dsah_rt.codes import pack, write_codes
from dsah_rt.errors import SearchIndexError
from dsah_rt.index import BinaryIndex, MIHIndex, index_factory, load_index
from dsah_rt.index.mih import check_substrings, default_substrings

few = settings(max_examples=25)


def _mih(db01: np.ndarray, bits: int, m: int | None, cuts=(), scan_cost: int | None = 0) -> MIHIndex:
    index = MIHIndex(bits, m)
    if scan_cost is not None:
        index.scan_cost = scan_cost
    for a, b in zip([0, *cuts], [*cuts, len(db01)]):  # several adds: the tables are rebuilt
        index.add(pack(db01[a:b]))
    return index


def _assert_range(index, q01, db01, radius):
    lims, D, I = index.range_search(pack(q01), radius)
    rl, rd, ri = ref.range_search(q01, db01, radius)
    assert lims.dtype == I.dtype == np.int64 and D.dtype == np.int32
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(I, ri)
    np.testing.assert_array_equal(D, rd)


# Substrings of at most 16 bits: probing every key of every table is cheap, so k and the radius can be
# anything without the fallback. Longer substrings are covered below, with queries near the database.
short_substrings = st.sampled_from([8, 12, 24, 36, 48, 64, 96, 128, 256]).flatmap(
    lambda bits: st.tuples(code_sets(max_db=120, bits=bits), st.integers(-(-bits // 16), bits))
)


@few
@given(short_substrings, st.data())
def test_probing_alone_equals_stable_brute_force_ranking(case, data):
    (bits, q01, db01, _, _), m = case
    k = data.draw(st.sampled_from([1, len(db01), data.draw(st.integers(1, len(db01)))]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(db01)), max_size=3)))
    D, I = _mih(db01, bits, m, cuts).search(pack(q01), k)
    assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == I.shape == (len(q01), k)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))


@few
@given(short_substrings, st.data())
def test_probing_alone_range_search_matches_reference(case, data):
    (bits, q01, db01, _, _), m = case
    # A radius some code sits at exactly, so an off-by-one in "distance <= radius" shows.
    radius = data.draw(st.sampled_from([*np.unique(ref.distances(q01, db01)).tolist(), bits + 5]))
    _assert_range(_mih(db01, bits, m), q01, db01, radius)


@st.composite
def near_duplicates(draw):
    """Substrings of 17..32 bits (buckets shared by several keys, narrowed by their low bits): a database
    of a few codes repeated with 0-1 flipped bits, queries within 2 bits of one of them, small k."""
    bits = draw(st.sampled_from([17, 24, 37, 48, 64, 100]))
    m = draw(st.integers(-(-bits // 32), bits // 17))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.integers(0, 2, (draw(st.integers(1, 6)), bits), dtype=np.uint8)
    # Each code at least 5 times, so every query's k-th neighbour is within 3 bits (cheap to probe).
    which = np.concatenate([np.repeat(np.arange(len(base)), 5), rng.integers(0, len(base), draw(st.integers(0, 100)))])
    db01 = base[rng.permutation(which)]
    flipped = np.flatnonzero(rng.random(len(db01)) < 0.5)
    db01[flipped, rng.integers(0, bits, len(flipped))] ^= 1
    q01 = base[rng.integers(0, len(base), 5)]
    for _ in range(draw(st.integers(0, 2))):
        q01[np.arange(5), rng.integers(0, bits, 5)] ^= 1
    return bits, m, q01, db01, draw(st.integers(1, 5))


@few
@given(near_duplicates())
def test_probing_alone_with_long_substrings(case):
    bits, m, q01, db01, k = case
    index = _mih(db01, bits, m)
    assert (index.tables().layout[:, 1] > 16).all()
    D, I = index.search(pack(q01), k)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    _assert_range(index, q01, db01, 2)


@few
@given(code_sets(max_db=120), st.data())
def test_any_substrings_with_the_fallback_equals_brute_force(case, data):
    bits, q01, db01, _, _ = case
    m = data.draw(st.integers(-(-bits // 32), bits) | st.none())
    index = _mih(db01, bits, m, scan_cost=data.draw(st.sampled_from([1, 2, None])))
    k = data.draw(st.sampled_from([1, len(db01), data.draw(st.integers(1, len(db01)))]))
    D, I = index.search(pack(q01), k)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    radius = data.draw(st.sampled_from([*np.unique(ref.distances(q01, db01)).tolist(), bits + 5]))
    _assert_range(index, q01, db01, radius)


@pytest.mark.parametrize("bits, m", [(24, 2), (64, 2), (64, 4)])
def test_a_block_split_into_windows_and_sorted_by_top_bits_gives_the_same_results(monkeypatch, bits, m):
    # A block takes each step's (query, key) pairs in windows of at most MAX_PAIRS, grouped by the top
    # COUNTING_BITS of the bucket id: both far smaller here, so windows split the masks and the queries
    # of a step, and buckets share a digit (bucket ids of 16 bits, or 12 at 24 bits / 2).
    from dsah_rt import mih_ops

    rng = np.random.default_rng(bits + m)
    protos = rng.integers(0, 2, (6, bits), dtype=np.uint8)
    db01 = protos[rng.integers(0, 6, 2000)] ^ (rng.random((2000, bits)) < 0.08).astype(np.uint8)
    q01 = protos[rng.integers(0, 6, 23)] ^ (rng.random((23, bits)) < 0.08).astype(np.uint8)
    index = _mih(db01, bits, m)
    monkeypatch.setattr(mih_ops, "MAX_PAIRS", 7)
    monkeypatch.setattr(mih_ops, "COUNTING_BITS", 3)
    for k in (1, 10, 300):
        D, I = index.search(pack(q01), k)
        ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    _assert_range(index, q01, db01, bits // 8)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_the_stop_waits_for_a_lower_index_tie_found_at_the_last_step(m):
    # A (index 0) differs from the query by one bit in each of substrings 0..m-2: it is first reached
    # at step (0, m-1). B (index 1) differs by one bit in each of substrings 1..m-1: reached at (0, 0).
    # Both are at distance m-1, which is exact only after (0, m-1) (every item within m*0 + m-1 found).
    # Stopping one step early returns B; within radius m-1, it misses A.
    bits = 8 * m
    q01 = np.zeros((1, bits), np.uint8)
    db01 = np.ones((6, bits), np.uint8)  # far-away filler
    db01[:2] = 0
    for j in range(m - 1):
        db01[0, 8 * j] = 1
        db01[1, 8 * (j + 1)] = 1
    index = _mih(db01, bits, m)
    D, I = index.search(pack(q01), 1)
    assert (D[0, 0], I[0, 0]) == (m - 1, 0)
    lims, D, I = index.range_search(pack(q01), m - 1)
    assert I.tolist() == [0, 1] and D.tolist() == [m - 1, m - 1]


@pytest.mark.parametrize("bits", [64, 128])
def test_buckets_longer_than_a_verified_chunk_keep_the_order(bits):
    # Buckets several CHUNKs long (the first half of every code shared), whose items tie at a few
    # distances; the heap fills in the middle of the first one, and the range search spans them all.
    from dsah_rt.mih_kernels import CHUNK

    rng = np.random.default_rng(11)
    n = 7 * CHUNK
    db01 = np.tile(rng.integers(0, 2, (1, bits), dtype=np.uint8), (n, 1))
    db01[:, bits // 2 :] = rng.integers(0, 2, (4, bits - bits // 2), dtype=np.uint8)[rng.integers(0, 4, n)]
    q01 = db01[rng.integers(0, n, 6)] ^ (rng.random((6, bits)) < 0.05).astype(np.uint8)
    index = _mih(db01, bits, bits // 32)
    for k in (1, CHUNK + 3, n):
        D, I = index.search(pack(q01), k)
        ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    _assert_range(index, q01, db01, bits // 4)


@pytest.fixture
def clustered():
    rng = np.random.default_rng(3)
    protos = rng.integers(0, 2, (20, 64), dtype=np.uint8)
    db01 = protos[rng.integers(0, 20, 3000)] ^ (rng.random((3000, 64)) < 0.03).astype(np.uint8)
    db01[1000:1500] = db01[:500]  # exact duplicates: ties at distance 0
    # Half the queries are database codes (cheap to answer by probing), half uniform (far from all).
    q01 = np.concatenate([db01[rng.integers(0, 3000, 20)], rng.integers(0, 2, (20, 64), dtype=np.uint8)])
    return q01, db01


@pytest.mark.parametrize("k", [1, 10, 100])
def test_fallback_to_the_scan_serves_only_costly_queries(clustered, monkeypatch, k):
    from dsah_rt.index import mih

    monkeypatch.setattr(mih, "SAMPLE", len(clustered[0]))  # a batch too small to sample: query by query
    q01, db01 = clustered
    scanned = []
    scan, scan_range = BinaryIndex.search, BinaryIndex.range_search
    monkeypatch.setattr(BinaryIndex, "search", lambda self, q, k: scanned.append(len(q)) or scan(self, q, k))
    monkeypatch.setattr(BinaryIndex, "range_search", lambda self, q, r: scanned.append(len(q)) or scan_range(self, q, r))
    index = _mih(db01, 64, None, scan_cost=None)
    D, I = index.search(pack(q01), k)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    _assert_range(index, q01, db01, 4)  # here the near queries cost more (full buckets)
    assert len(scanned) == 2 and all(0 < n < len(q01) for n in scanned), scanned


@pytest.mark.parametrize("near", [False, True])
def test_a_batch_whose_sample_passes_its_budget_is_scanned_without_probing_the_rest(monkeypatch, near):
    # 2,000 128-bit codes in 50 tight clusters, 8 tables of 16 bits: a uniform query's neighbours lie
    # ~45 bits away (radius 5 in every table: 8 x 4,368 probes), far past the sample's budget (one
    # batched-scan query: 2,000 x 2 words / 8 candidates), while a database code's lie a few bits
    # away (radius 0 in a few tables).
    from dsah_rt import mih_ops
    from dsah_rt.index import mih

    rng = np.random.default_rng(5)
    protos = rng.integers(0, 2, (50, 128), dtype=np.uint8)
    db01 = protos[rng.integers(0, 50, 2000)] ^ (rng.random((2000, 128)) < 0.02).astype(np.uint8)
    db01[1000:1100] = db01[:100]  # ties at distance 0
    nq = 2 * mih.SAMPLE + 7
    q01 = db01[rng.integers(0, 2000, nq)] if near else rng.integers(0, 2, (nq, 128), dtype=np.uint8)
    probed = []
    for name in ("topk", "range_counts"):
        real = getattr(mih_ops, name)
        monkeypatch.setattr(mih_ops, name, lambda qw, *a, real=real: probed.append(len(qw)) or real(qw, *a))
    index = _mih(db01, 128, 8, scan_cost=None)
    D, I = index.search(pack(q01), 10)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    _assert_range(index, q01, db01, 6 if near else 40)
    # Far queries: the sample alone is probed; near ones: the sample, then the rest; and a radius of 6,
    # cheap even for uniform codes (7 probes at radius 0), in one go, without a sample.
    assert probed == ([mih.SAMPLE, nq - mih.SAMPLE, nq] if near else [mih.SAMPLE] * 2), probed


def test_uniform_reach_and_work_match_counting():
    from dsah_rt.index.mih import uniform_reach, uniform_work

    rng = np.random.default_rng(2)
    for bits in (8, 12, 16):
        within = np.cumsum(np.bincount([bin(c).count("1") for c in range(2**bits)], minlength=bits + 1))
        for ntotal, k in zip(rng.integers(1, 10**6, 20), rng.integers(1, 1000, 20)):
            expected = np.flatnonzero(ntotal * within >= k * 2**bits)
            assert uniform_reach(bits, int(ntotal), int(k)) == (expected[0] if len(expected) else bits)
    # Two 8-bit tables of 16 codes: steps (0, 0), (0, 1), (1, 0) are 1 + 1 + 8 probes of 16 + 16/256.
    layout = np.array([[0, 8, 8, 0], [8, 8, 8, 257]])
    assert uniform_work(layout, 16, 2) == pytest.approx(10 * (16 + 16 / 256))


def test_default_substrings_fit_tables():
    for bits in range(1, 1025):
        for n in (0, 1, 1000, 10**7, 2**32 - 1):
            check_substrings(bits, default_substrings(bits, n))
    # About log2(N / 64)-bit substrings: at 10M codes, 16-bit ones for 32 and 64 bits.
    assert (default_substrings(32, 10**7), default_substrings(64, 10**7)) == (2, 4)


def test_specs_and_bad_substrings():
    assert isinstance(index_factory("MIH", 64), MIHIndex)
    assert index_factory("MIH5", 64).substrings == 5
    for spec, message in [("MIH0", "MIH0: 64-bit codes take 2..64"), ("MIH1", "MIH1: 64-bit codes take 2..64"),
                          ("MIH65", "MIH65: 64-bit codes take 2..64"), ("MIHx", "unknown index spec 'MIHx'")]:  # fmt: skip
        with pytest.raises(SearchIndexError, match=message):
            index_factory(spec, 64)


@few
@given(short_substrings, st.booleans())
def test_file_round_trip_and_mmap(tmp_path_factory, case, mmap):
    (bits, q01, db01, _, _), m = case
    path = tmp_path_factory.mktemp("idx") / "db.mih"
    _mih(db01, bits, m).save(path)
    before = path.read_bytes()
    rows = np.load(path, mmap_mode="r")  # the documented file: numpy opens the codes
    np.testing.assert_array_equal(rows[:, : pack(db01).shape[1]], pack(db01))
    index = load_index(path, mmap=mmap)
    assert isinstance(index, MIHIndex) and (index.bits, index.ntotal, index.substrings) == (bits, len(db01), m)
    index.scan_cost = 0
    D, I = index.search(pack(q01), len(db01))
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    index.add(pack(db01[:3]))  # adding to a mapped index copies, never writes to the file
    assert path.read_bytes() == before
    both = np.concatenate([db01, db01[:3]])
    D, I = index.search(pack(q01), len(both))
    ref.assert_ranking_prefix(D, I, ref.distances(q01, both))


def _footer(data: bytes) -> tuple[dict, int]:
    length = int.from_bytes(data[-16:-8], "little")
    return json.loads(data[-16 - length : -16]), len(data) - 16 - length


def _rewritten(data: bytes, **changes) -> bytes:
    footer, at = _footer(data)
    raw = json.dumps({**footer, **changes}).encode()
    return data[:at] + raw + len(raw).to_bytes(8, "little") + data[-8:]


def test_corrupt_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.mih"
    _mih(rng.integers(0, 2, (200, 40), dtype=np.uint8), 40, 2).save(good)
    data = good.read_bytes()
    footer, _ = _footer(data)
    offsets = footer["arrays"]["offsets"]
    bad_offsets = bytearray(data)
    bad_offsets[offsets + 8 : offsets + 16] = (10**6).to_bytes(8, "little")  # bucket 0 ends past the table
    cases = {
        "offsets": (bytes(bad_offsets), "corrupt index file (bucket offsets"),
        "substrings": (_rewritten(data, substrings=1), "corrupt index footer (MIH1: 40-bit codes take 2..40"),
        "ntotal": (_rewritten(data, ntotal=201), "corrupt index file (codes uint8 (200, 8), not 201"),
        "array": (_rewritten(data, arrays={**footer["arrays"], "rows": len(data)}), "corrupt index file ((2, 200, 1) uint64"),
        "format": (_rewritten(data, format="other/1"), "not a dsah-rt-mih/1 index"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SearchIndexError, match=re.escape(message)):
            load_index(tmp_path / name)


# --- the command line -------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("substrings", [None, 3])
def test_cli_mih_build_and_search_give_the_brute_force_ranking(tmp_path, substrings):
    rng = np.random.default_rng(1)
    protos = rng.integers(0, 2, (4, 48), dtype=np.uint8)
    db01 = protos[rng.integers(0, 4, 400)] ^ (rng.random((400, 48)) < 0.05).astype(np.uint8)
    db01[200:300] = db01[:100]
    q01 = np.concatenate([db01[:3], rng.integers(0, 2, (3, 48), dtype=np.uint8)])
    write_codes(tmp_path / "db.npy", pack(db01), 48)
    write_codes(tmp_path / "q.npy", pack(q01), 48)
    extra = [] if substrings is None else ["--substrings", substrings]
    res = run("index", "build", tmp_path / "db.npy", "--mih", *extra, "--out", tmp_path / "db.mih")
    assert res.exit_code == 0 and "-> mih index" in res.output, res.output
    assert load_index(tmp_path / "db.mih").substrings == (substrings or default_substrings(48, 400))
    for k in (1, 10, 400):
        res = run("search", "--index", tmp_path / "db.mih", "-q", tmp_path / "q.npy", "-k", k, "--out", tmp_path / "r.npz")
        assert res.exit_code == 0, res.output
        r = np.load(tmp_path / "r.npz")
        ref.assert_ranking_prefix(r["distances"], r["indices"], ref.distances(q01, db01))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mih", "--faiss", "BFlat"], "give at most one of --faiss and --mih"),
        (["--substrings", "2"], "--substrings needs --mih"),
        (["--mih", "--substrings", "1"], "db.npy: MIH1: 48-bit codes take 2..48 substrings"),
        (["--mih", "--substrings", "49"], "db.npy: MIH49: 48-bit codes take 2..48 substrings"),
    ],
)
def test_cli_bad_mih_options_are_one_line_errors(tmp_path, args, message):
    write_codes(tmp_path / "db.npy", pack(np.zeros((10, 48), np.uint8)), 48)
    res = run("index", "build", tmp_path / "db.npy", *args, "--out", tmp_path / "r.mih")
    assert_one_line_error(res, message, tmp_path, "r.*")
