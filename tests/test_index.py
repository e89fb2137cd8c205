"""Every index kind against brute force (unpacked bits, stable sort by (distance, index)), on codes with
many ties; file round trips; the `dsah-rt index build` / `search --index` contract with FAISS."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import code_sets
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cli_checks import assert_one_line_error
from dsah_rt import popcount_numpy
from dsah_rt.cli import main
from dsah_rt.codes import pack, swap_bit_order, write_codes
from dsah_rt.errors import SearchIndexError
from dsah_rt.index import KINDS, BinaryIndex, Index, build_index, index_factory, load_index

faiss = pytest.importorskip("faiss", reason="the FAISS kind and the bit-order checks need faiss-cpu")

# Example specs of every registered kind; a kind added without examples fails the first test.
SPECS = {"exact": ["exact"], "mih": ["MIH", "MIH3"], "faiss": ["BFlat", "BIVF4", "BHNSW8"]}
ALL_SPECS = [spec for specs in SPECS.values() for spec in specs]
FAISS_LENGTHS = [12, 24, 48, 64, 100]
few = settings(max_examples=25)


def _build(spec: str, db01: np.ndarray, bits: int) -> Index:
    index = index_factory(spec, bits)
    if len(db01) >= 4 or spec != "BIVF4":  # IVF's k-means needs at least nlist training codes
        index.add(pack(db01))
    else:
        index.add(pack(np.concatenate([db01] * 4)))
    return index


def _assert_true_distances(q01, db01, D, I):
    """Approximate kinds may miss neighbours, never misreport: each id's distance is its true one."""
    dist = ref.distances(q01, db01)
    found = I >= 0
    rows = np.nonzero(found)[0]
    np.testing.assert_array_equal(D[found], dist[rows, I[found]])
    for i in range(len(q01)):
        ids = I[i][found[i]]
        assert len(set(ids.tolist())) == len(ids)
        assert np.all(np.diff(D[i][found[i]]) >= 0)


def test_every_registered_kind_has_examples():
    assert {kind.kind for kind in KINDS} == set(SPECS)
    for kind, specs in SPECS.items():
        assert all(type(index_factory(spec, 16)).kind == kind for spec in specs)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_protocol_conformance(spec, tmp_path):
    rng = np.random.default_rng(0)
    db01 = rng.integers(0, 2, (300, 24), dtype=np.uint8)
    q01 = rng.integers(0, 2, (4, 24), dtype=np.uint8)
    index = index_factory(spec, 24)
    assert isinstance(index, Index) and index.ntotal == 0
    index.add(pack(db01[:200]))
    index.add(db01[200:].astype(np.int8) * 2 - 1)  # ±1 rows are packed on the way in
    assert index.ntotal == 300
    D, I = index.search(pack(q01), 7)
    assert D.shape == I.shape == (4, 7) and D.dtype == np.int32 and I.dtype == np.int64
    _assert_true_distances(q01, db01, D, I)
    loaded = load_index(index.save(tmp_path / "i.idx"))
    assert type(loaded) is type(index) and loaded.ntotal == 300
    np.testing.assert_array_equal(loaded.search(pack(q01), 7)[0], D)
    index.reset()
    assert index.ntotal == 0
    index.add(pack(db01))
    assert index.ntotal == 300


@few
@given(code_sets(max_db=80), st.data(), st.sampled_from(["numpy", "numba"]))
def test_exact_kind_equals_stable_brute_force_ranking(case, data, path):
    bits, q01, db01, _, _ = case
    K = data.draw(st.integers(1, len(db01)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(db01)), max_size=4)))
    index = index_factory("exact", bits)
    for a, b in zip([0, *cuts], [*cuts, len(db01)]):  # several adds grow the buffer
        index.add(pack(db01[a:b]))
    # inputs this small take NumPy's path in a process without the kernels (cold start), else the kernels'
    with mock.patch.object(popcount_numpy, "is_tiny", lambda *shape: path == "numpy"):
        D, I = index.search(pack(q01), K)
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))


def test_once_the_kernels_are_loaded_no_search_is_tiny():
    from dsah_rt import hamming  # noqa: F401 - loaded, as in a service after its first search

    assert not popcount_numpy.is_tiny(1, 10, 1)


def test_a_tiny_search_runs_without_numba(tmp_path):
    """A fresh `dsah-rt search` on a few codes never imports Numba, and reports its load time."""
    rng = np.random.default_rng(0)
    write_codes(tmp_path / "db.npy", pack(rng.integers(0, 2, (50, 48), dtype=np.uint8)), bits=48)
    write_codes(tmp_path / "q.npy", pack(rng.integers(0, 2, (5, 48), dtype=np.uint8)), bits=48)
    program = ("import sys; from dsah_rt.cli import main; sys.argv = ['dsah-rt', 'search', '--db-codes', 'db.npy', "
               "'--query-codes', 'q.npy', '-k', '3', '--out', 'r.npz']\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\nprint('numba' in sys.modules)")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "False", res.stderr
    with np.load(tmp_path / "r.npz") as r:
        assert r["load_seconds"] > 0 and r["seconds"] >= 0 and r["indices"].shape == (5, 3)


@few
@given(st.sampled_from(FAISS_LENGTHS).flatmap(lambda bits: code_sets(max_db=80, bits=bits)), st.data())
def test_faiss_flat_distances_equal_ours(case, data):
    bits, q01, db01, _, _ = case
    K = data.draw(st.integers(1, len(db01)))
    D, I = build_index(pack(db01), "exact", bits).search(pack(q01), K)
    FD, FI = build_index(pack(db01), "BFlat", bits).search(pack(q01), K)
    np.testing.assert_array_equal(FD, D)
    _assert_true_distances(q01, db01, FD, FI)
    # FAISS orders ties its own way; everything closer than the k-th distance is the same set.
    for i in range(len(q01)):
        closer = D[i] < D[i, -1]
        assert set(FI[i][closer]) == set(I[i][closer])


@pytest.mark.parametrize("spec", ["BIVF4", "BHNSW8"])
def test_approximate_kinds_recall_and_report_true_distances(spec):
    rng = np.random.default_rng(5)
    protos = rng.integers(0, 2, (8, 64), dtype=np.uint8)

    def draw(n):
        return protos[rng.integers(0, 8, n)] ^ (rng.random((n, 64)) < 0.1).astype(np.uint8)

    db01, q01 = draw(3000), draw(50)
    k = 10
    D, I = build_index(pack(db01), spec, 64).search(pack(q01), k)
    _assert_true_distances(q01, db01, D, I)
    # Recall by distance, so ties at the k-th distance count whichever of them is returned.
    kth = np.sort(ref.distances(q01, db01), axis=1)[:, k - 1]
    recall = ((D <= kth[:, None]) & (I >= 0)).sum() / (k * len(q01))
    assert recall >= 0.8, recall


@pytest.mark.parametrize("spec", ["exact", "BFlat", "BIVF4"])
@few
@given(case=code_sets(max_db=80), data=st.data())
def test_range_search_matches_reference(spec, case, data):
    bits, q01, db01, _, _ = case
    index = _build(spec, db01, bits)
    db_all = db01 if index.ntotal == len(db01) else np.concatenate([db01] * 4)
    # A radius some code sits at exactly, so an off-by-one in "distance <= radius" shows.
    radius = data.draw(st.sampled_from([*np.unique(ref.distances(q01, db01)).tolist(), bits + 5]))
    lims, D, I = index.range_search(pack(q01), radius)
    rl, rd, ri = ref.range_search(q01, db_all, radius)
    assert lims.dtype == I.dtype == np.int64 and D.dtype == np.int32
    if spec == "BIVF4":  # searches one of four lists: a subset, in (distance, index) order
        for i in range(len(q01)):
            got, want = I[lims[i] : lims[i + 1]], ri[rl[i] : rl[i + 1]]
            assert set(got) <= set(want)
            np.testing.assert_array_equal(got, want[np.isin(want, got)])
        return
    np.testing.assert_array_equal(lims, rl)
    np.testing.assert_array_equal(I, ri)
    np.testing.assert_array_equal(D, rd)


def test_hnsw_range_search_is_a_one_line_user_error():
    index = build_index(np.zeros((5, 2), np.uint8), "BHNSW8", 16)
    with pytest.raises(SearchIndexError, match="BHNSW8: range search not implemented"):
        index.range_search(np.zeros((1, 2), np.uint8), 3)


@few
@given(code_sets(max_db=80), st.booleans())
def test_exact_file_round_trip_and_mmap(tmp_path_factory, case, mmap):
    bits, q01, db01, _, _ = case
    path = tmp_path_factory.mktemp("idx") / "db.idx"
    build_index(pack(db01), "exact", bits).save(path)
    before = path.read_bytes()
    # The documented file: a plain .npy of the packed rows, zero-padded to whole words.
    rows = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(rows[:, : pack(db01).shape[1]], pack(db01))
    assert not rows[:, pack(db01).shape[1] :].any() and rows.shape[1] % 8 == 0
    index = load_index(path, mmap=mmap)
    assert isinstance(index, BinaryIndex) and index.bits == bits and index.ntotal == len(db01)
    index.add(pack(db01[:3]))  # adding to a mapped index copies, never writes to the file
    assert path.read_bytes() == before
    both = np.concatenate([db01, db01[:3]])
    D, I = index.search(pack(q01), len(both))
    ref.assert_ranking_prefix(D, I, ref.distances(q01, both))


@pytest.mark.parametrize("spec", ["BFlat", "BIVF4", "BHNSW8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_faiss_file_opens_in_faiss_and_back(tmp_path, spec, mmap):
    rng = np.random.default_rng(1)
    db01 = rng.integers(0, 2, (400, 12), dtype=np.uint8)
    q01 = rng.integers(0, 2, (5, 12), dtype=np.uint8)
    index = build_index(pack(db01), spec, 12)
    index.save(tmp_path / "f.idx")
    theirs = faiss.read_index_binary(str(tmp_path / "f.idx"))
    assert theirs.d == 16 and theirs.ntotal == 400
    ours = load_index(tmp_path / "f.idx", mmap=mmap)
    D, I = ours.search(pack(q01), 9)
    np.testing.assert_array_equal(D, theirs.search(pack(q01), 9)[0])
    _assert_true_distances(q01, db01, D, I)


@few
@given(st.integers(1, 70), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_swap_bit_order_gives_faiss_real_to_binary(bits, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, bits)).astype(np.float32)
    x[x == 0] = 1.0  # FAISS sets a bit for x > 0, ours for u >= 0: they differ only at exactly 0
    d = 8 * ((bits + 7) // 8)
    padded = np.full((n, d), -1.0, np.float32)  # FAISS packs whole bytes; negative padding is 0 bits
    padded[:, :bits] = x
    theirs = np.zeros((n, d // 8), np.uint8)
    for row, out in zip(padded, theirs):  # real_to_binary packs one vector
        faiss.real_to_binary(d, faiss.swig_ptr(row), faiss.swig_ptr(out))
    ours = pack(x >= 0)
    np.testing.assert_array_equal(swap_bit_order(ours), theirs)
    np.testing.assert_array_equal(swap_bit_order(theirs), ours)


def test_index_import_does_not_import_faiss():
    code = "import sys, dsah_rt.index; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SearchIndexError, match="need the faiss package"):
        index_factory("BFlat", 16)


def test_unknown_spec():
    with pytest.raises(SearchIndexError, match="unknown index spec 'ivf'"):
        index_factory("ivf", 16)
    with pytest.raises(SearchIndexError, match="FAISS cannot build 'BXYZ'"):
        index_factory("BXYZ", 16)


# --- the command line -------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 2, (3, 12), dtype=np.uint8)
    db01 = protos[rng.integers(0, 3, 120)] ^ (rng.random((120, 12)) < 0.1).astype(np.uint8)
    q01 = rng.integers(0, 2, (6, 12), dtype=np.uint8)
    write_codes(tmp_path / "db.npy", pack(db01), 12)
    write_codes(tmp_path / "q.npy", pack(q01), 12)
    return tmp_path, q01, db01


@pytest.mark.parametrize("bits", [12, 64])
def test_cli_faiss_build_opens_in_faiss_and_matches_search(tmp_path, bits):
    rng = np.random.default_rng(bits)
    db01 = rng.integers(0, 2, (150, bits), dtype=np.uint8)
    db01[50:100] = db01[:50]  # duplicated rows: ties
    q01 = np.concatenate([db01[:3], rng.integers(0, 2, (3, bits), dtype=np.uint8)])
    write_codes(tmp_path / "db.npy", pack(db01), bits)
    write_codes(tmp_path / "q.npy", pack(q01), bits)
    res = run("index", "build", tmp_path / "db.npy", "--faiss", "BFlat", "--out", tmp_path / "db.faiss")
    assert res.exit_code == 0, res.output
    res = run("search", "-d", tmp_path / "db.npy", "-q", tmp_path / "q.npy", "-k", 10, "--out", tmp_path / "ours.npz")
    assert res.exit_code == 0, res.output
    ours = np.load(tmp_path / "ours.npz")
    theirs = faiss.read_index_binary(str(tmp_path / "db.faiss"))
    np.testing.assert_array_equal(theirs.search(pack(q01), 10)[0], ours["distances"])
    res = run("search", "--index", tmp_path / "db.faiss", "-q", tmp_path / "q.npy", "-k", 10, "--out", tmp_path / "f.npz")
    assert res.exit_code == 0, res.output
    via_index = np.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(via_index["distances"], ours["distances"])
    _assert_true_distances(q01, db01, via_index["distances"], via_index["indices"])


def test_cli_exact_index_file_gives_the_same_ranking(files):
    d, q01, db01 = files
    assert run("index", "build", d / "db.npy", "--out", d / "db.idx").exit_code == 0
    res = run("search", "--index", d / "db.idx", "-q", d / "q.npy", "-k", 120, "--out", d / "r.npz")
    assert res.exit_code == 0, res.output
    r = np.load(d / "r.npz")
    ref.assert_ranking_prefix(r["distances"], r["indices"], ref.distances(q01, db01))


def _bad(d):
    (d / "garbage.idx").write_bytes(b"\x00garbage, not an index")
    run("index", "build", d / "db.npy", "--out", d / "good.idx")
    run("index", "build", d / "db.npy", "--faiss", "BFlat", "--out", d / "good.faiss")
    (d / "cut.idx").write_bytes((d / "good.idx").read_bytes()[:-30])
    exact = (d / "good.idx").read_bytes()
    (d / "hole.idx").write_bytes(exact[:200] + exact[260:])  # rows missing, footer intact
    (d / "cut.faiss").write_bytes((d / "good.faiss").read_bytes()[:40])
    np.save(d / "codes24.npy", np.zeros((6, 3), np.uint8))
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "build", "{d}/missing.npy", "--out", "{d}/r.idx"], "missing.npy: no such file"),
        (["index", "build", "{d}/db.npy", "--faiss", "BXYZ", "--out", "{d}/r.idx"], "FAISS cannot build 'BXYZ'"),
        (["index", "build", "{d}/db.npy", "--faiss", "BIVF1000", "--out", "{d}/r.idx"], "db.npy: BIVF1000: Number of training points (120)"),
        (["index", "build", "{d}/db.npy", "--faiss", "ivf", "--out", "{d}/r.idx"], "unknown index spec 'ivf'"),
        (["index", "build", "{d}/db.npy", "--out", "{d}/no/dir/r.idx"], "does not exist"),
        (["search", "--index", "{d}/missing.idx", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "missing.idx: no such index file"),
        (["search", "--index", "{d}/garbage.idx", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "garbage.idx: not an index file"),
        (["search", "--index", "{d}/cut.idx", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "cut.idx: not an index file"),
        (["search", "--index", "{d}/hole.idx", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "hole.idx: corrupt index file"),
        (["search", "--index", "{d}/cut.faiss", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "cut.faiss: not a readable FAISS binary index"),
        (["search", "--index", "{d}/good.idx", "-q", "{d}/codes24.npy", "--out", "{d}/r.npz"], "codes24.npy has 24-bit codes but"),
        (["search", "--index", "{d}/good.faiss", "-q", "{d}/codes24.npy", "--out", "{d}/r.npz"], "codes24.npy has 24-bit codes but"),
        (["search", "--index", "{d}/good.idx", "-q", "{d}/q.npy", "-k", "121", "--out", "{d}/r.npz"], "good.idx: -k 121 must be between 1 and the database size 120"),
        (["search", "--index", "{d}/good.idx", "-d", "{d}/db.npy", "-q", "{d}/q.npy", "--out", "{d}/r.npz"], "exactly one of --db-codes and --index"),
    ],
)
def test_bad_input_is_one_line_error_without_output(files, args, message):
    d = _bad(files[0])
    assert_one_line_error(run(*[a.format(d=d) for a in args]), message, d, "r.*")
