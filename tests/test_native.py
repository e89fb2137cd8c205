"""The compiled kernels' library (`native`, `native_build`): built once, loaded without Numba, and the
same results as Numba compiling the same entries in the process (the route taken where no library
can be built)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from dsah_rt import native, ranking
from dsah_rt.codes import nbytes_for, pack
from dsah_rt.index import MIHIndex
from dsah_rt.popcount_numpy import words

# A fresh process that searches and evaluates: which kernels it ran and whether Numba was imported.
FRESH = """
import sys
import numpy as np
from dsah_rt import native, ranking
rng = np.random.default_rng(0)
q, d = rng.integers(0, 2**63, (70, 1), dtype=np.uint64), rng.integers(0, 2**63, (5000, 1), dtype=np.uint64)
ranking.topk(q, d, 64, 10)
ql, dl = ranking.label_words(rng.integers(0, 3, 70), rng.integers(0, 3, 5000))
hist, *_ = ranking.index_order(q, d, ql, dl, 64, 0, np.array([1, 10]))
ranking.tie_aware_ap(hist)
print("numba" in sys.modules, type(native.kernels()["topk"]).__name__)
"""


def test_a_process_ranks_without_importing_numba() -> None:
    native.kernels()  # builds the library if this checkout has none yet
    res = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "CFunctionType"] and res.stderr == ""


# A fresh process that builds an MIH index (40-bit codes: substrings wider than their buckets, so the
# tables of 20-bit substrings in 16-bit buckets are sorted twice), saves it and searches the saved file.
MIH_FRESH = """
import sys
import numpy as np
from dsah_rt.index import MIHIndex, load_index
built = MIHIndex(40, 2)
built.add(np.load(sys.argv[1]))
built.save(sys.argv[2])
index, q = load_index(sys.argv[2], mmap=True), np.load(sys.argv[3])
index.scan_cost = 0  # MIH alone: the exact kind's range scan is a Numba kernel
np.savez(sys.argv[4], *index.search(q, 7), *index.range_search(q, 12))
print("numba" in sys.modules, index.substrings)
"""


def test_a_process_builds_and_searches_an_mih_index_without_importing_numba(tmp_path: Path) -> None:
    native.kernels()
    rng = np.random.default_rng(5)
    protos = rng.integers(0, 2, (3, 40), dtype=np.uint8)
    db01 = protos[rng.integers(0, 3, 4000)] ^ (rng.random((4000, 40)) < 0.1).astype(np.uint8)
    q01 = np.concatenate([db01[:10], rng.integers(0, 2, (10, 40), dtype=np.uint8)])
    np.save(tmp_path / "db.npy", pack(db01))
    np.save(tmp_path / "q.npy", pack(q01))
    paths = [str(tmp_path / name) for name in ("db.npy", "codes.mih", "q.npy", "r.npz")]
    res = subprocess.run([sys.executable, "-c", MIH_FRESH, *paths], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "2"] and res.stderr == ""
    D, I, lims, rD, rI = np.load(tmp_path / "r.npz").values()
    ref.assert_ranking_prefix(D, I, ref.distances(q01, db01))
    want = ref.range_search(q01, db01, 12)
    for got, expected in zip((lims, rD, rI), want):
        np.testing.assert_array_equal(got, expected)


def _random_case(rng: np.random.Generator, bits: int, nq: int, n: int, multi: int):
    # multi: 0 for class ids, else that many multi-hot labels (70: two label words)
    protos = rng.integers(0, 2, (4, bits), dtype=np.uint8)
    group = rng.integers(0, 4, n + nq)
    codes = protos[group] ^ (rng.random((n + nq, bits)) < 0.05).astype(np.uint8)
    labels = (rng.random((n + nq, multi)) < 1.5 / multi).astype(np.uint8) if multi else group % 3
    qw, dw = words(np.packbits(codes[:nq], axis=1)), words(np.packbits(codes[nq:], axis=1))
    return qw, dw, *ranking.label_words(labels[:nq], labels[nq:]), codes[:nq], codes[nq:], labels[:nq], labels[nq:]


def _all_entries(qw, dw, qlw, dlw, bits, k, mih):
    D, I = ranking.topk(qw, dw, bits, k)
    hist, ap, found, at_grid = ranking.index_order(qw, dw, qlw, dlw, bits, 0, np.array([1, 3, 50], np.int64))
    queries = qw.view(np.uint8)[:, : nbytes_for(bits)]
    return (D, I, hist, ap, found, at_grid, *ranking.tie_aware_ap(hist), *mih.search(queries, k),
            *mih.range_search(queries, bits // 4))  # fmt: skip


@pytest.fixture(scope="module")
def in_process_kernels():
    from dsah_rt import native_build

    return native_build.in_process()


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([7, 48, 64, 100, 192, 256, 320]), seed=st.integers(0, 2**32 - 1),
       nq=st.integers(1, 40), n=st.integers(1, 2500), multi=st.sampled_from([0, 5, 70]), k=st.integers(1, 60))  # fmt: skip
def test_library_and_in_process_numba_agree_with_the_reference(in_process_kernels, bits, seed, nq, n, multi, k):
    qw, dw, qlw, dlw, q01, db01, qlab, dblab = _random_case(np.random.default_rng(seed), bits, nq, n, multi)
    k = min(k, n)
    mih = MIHIndex(bits)
    mih.scan_cost = 0  # its own probing only, never the exact kind's scan
    mih.add(pack(db01))
    library = _all_entries(qw, dw, qlw, dlw, bits, k, mih)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(native, "_loaded", in_process_kernels)
        numba_own = _all_entries(qw, dw, qlw, dlw, bits, k, mih)
    for a, b in zip(library, numba_own):
        if a.dtype.kind == "f":  # sums the compiler may reassociate differently at another vector width
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        else:
            np.testing.assert_array_equal(a, b)
    dist, rel = ref.distances(q01, db01), ref.relevance(qlab, dblab)
    ref.assert_ranking_prefix(library[0], library[1], dist)
    ref.assert_ranking_prefix(library[9], library[10], dist)
    for i in range(nq):
        ref.assert_close(library[3][i], ref.average_precision(rel[i][ref.ranking(dist[i])], None))


def test_the_build_refuses_a_runtime_helper_it_would_have_to_stub(tmp_path: Path, monkeypatch) -> None:
    from dsah_rt import native_build

    monkeypatch.setattr(native_build, "UNREACHED", native_build.UNREACHED - {"numba_do_raise"})
    with pytest.raises(native_build.CannotBuild, match="the kernels call Numba's numba_do_raise, which it does not carry"):
        native_build.build([tmp_path])
    assert not list(tmp_path.iterdir())


def test_without_a_compiler_numba_compiles_the_entries_in_the_process(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(native, "library_folders", lambda: iter([tmp_path]))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native, "_loaded", None)
    kernels = native.kernels()
    err = capsys.readouterr().err
    assert "cannot build the kernels' library (/bin/false failed" in err and not list(tmp_path.iterdir())
    assert all(type(fn).__name__ == "CFunctionType" for fn in kernels.values())
    qw, dw = np.arange(40, dtype=np.uint64)[:, None], np.arange(300, dtype=np.uint64)[::-1, None].copy()
    D, I = ranking.topk(qw, dw, 64, 5)
    ref.assert_ranking_prefix(D, I, np.bitwise_count(qw ^ dw.T).astype(np.int64))


def test_a_build_lands_whole_in_the_first_writable_folder(tmp_path: Path, monkeypatch) -> None:
    from dsah_rt import native_build

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(native, "library_folders", lambda: iter([blocked / "sub", tmp_path / "lib"]))
    built = native_build.build_library()
    assert built == native.library_path(tmp_path / "lib") and [p.name for p in (tmp_path / "lib").iterdir()] == [built.name]
    assert native.library_key() in built.name


def test_a_damaged_library_is_built_again(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(native, "library_folders", lambda: iter([tmp_path]))
    monkeypatch.setattr(native, "_loaded", None)
    native.library_path(tmp_path).write_bytes(b"\\x7fELF truncated by a full disk")
    kernels = native.kernels()
    err = capsys.readouterr().err
    assert "cannot load" in err and "building it again" in err and "compiled the kernels into" in err
    qw, dw = np.arange(40, dtype=np.uint64)[:, None], np.arange(300, dtype=np.uint64)[::-1, None].copy()
    D, I = ranking.topk(qw, dw, 64, 5)
    ref.assert_ranking_prefix(D, I, np.bitwise_count(qw ^ dw.T).astype(np.int64))
    assert type(kernels["topk"]).__name__ == "CFunctionType" and native.library_path(tmp_path).stat().st_size > 10_000
