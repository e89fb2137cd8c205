"""DeepHash-pytorch's conventions: its ±1 codes with exact zeros (--zeros-as), its file layout (codes export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import reference as ref
from cli_checks import assert_one_line_error, random_eval_files
from dsah_rt.bench.reference import numpy_map
from dsah_rt.cli import main
from dsah_rt.codes import pack, read_codes, unpack, write_codes
from dsah_rt.deephash import export_deephash
from dsah_rt.errors import CodesError

TIMES = {"seconds": 0, "load_seconds": 0}  # differ run to run


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sign_output(rng: np.random.Generator, rows: int, bits: int) -> np.ndarray:
    """What DeepHash-pytorch saves: torch.sign of float32 outputs, some of them exactly 0."""
    u = rng.normal(size=(rows, bits)).astype(np.float32)
    u[rng.random(u.shape) < 0.2] = 0.0
    return np.sign(u)


def expected_bits(signs: np.ndarray, zero: int) -> np.ndarray:
    """0/1 bits written out element by element: +1 -> 1, -1 -> 0, 0 -> the bit of `zero`."""
    out = np.empty(signs.shape, np.uint8)
    for index, value in np.ndenumerate(signs):
        out[index] = 1 if value > 0 or (value == 0 and zero == 1) else 0
    return out


@pytest.fixture
def sign_files(tmp_path):
    rng = np.random.default_rng(3)
    q, db = sign_output(rng, 7, 12), sign_output(rng, 40, 12)
    assert (q == 0).any() and (db == 0).any() and (q == -1).any()
    np.save(tmp_path / "tst_binary.npy", q)
    np.save(tmp_path / "trn_binary.npy", db)
    np.save(tmp_path / "tst_label.npy", np.eye(4, dtype=np.int8)[rng.integers(0, 4, 7)])
    np.save(tmp_path / "trn_label.npy", np.eye(4, dtype=np.int8)[rng.integers(0, 4, 40)])
    return tmp_path, q, db


@pytest.mark.parametrize("zero", [1, -1])
def test_zeros_read_as_the_sign_asked_for(sign_files, zero):
    d, q, _ = sign_files
    codes = read_codes(d / "tst_binary.npy", zeros_as=zero)
    assert codes.bits == 12
    np.testing.assert_array_equal(unpack(codes.packed, 12), expected_bits(q, zero))


def test_zeros_are_refused_without_the_option(sign_files):
    d, _, _ = sign_files
    with pytest.raises(CodesError, match="tst_binary.npy: values must be all 0/1 or all ±1"):
        read_codes(d / "tst_binary.npy")
    res = run("eval", "-q", d / "tst_binary.npy", "-d", d / "trn_binary.npy", "--query-labels", d / "tst_label.npy",
              "--db-labels", d / "trn_label.npy", "--json", d / "m.json")
    assert_one_line_error(res, "tst_binary.npy: values must be all 0/1 or all ±1", d, "m.json")


def test_zeros_as_refuses_zero_one_codes(tmp_path):
    np.save(tmp_path / "bits.npy", np.array([[0, 1, 1], [1, 0, 0]], np.float32))  # no -1: these are 0/1 codes
    with pytest.raises(CodesError, match="reads ±1 codes with zeros"):
        read_codes(tmp_path / "bits.npy", zeros_as=1)


@pytest.mark.parametrize("zero", ["+1", "-1"])
def test_eval_search_and_index_read_zeros_with_the_option(sign_files, zero):
    d, q, db = sign_files
    # The same codes written as 0/1 (int64: uint8 would read as packed) by the element-wise reference.
    np.save(d / "q01.npy", expected_bits(q, int(zero)).astype(np.int64))
    np.save(d / "db01.npy", expected_bits(db, int(zero)).astype(np.int64))
    labels = ["--query-labels", d / "tst_label.npy", "--db-labels", d / "trn_label.npy"]
    res = run("eval", "-q", d / "tst_binary.npy", "-d", d / "trn_binary.npy", *labels, "--zeros-as", zero, "--json", d / "a.json")
    assert res.exit_code == 0, res.output
    res = run("eval", "-q", d / "q01.npy", "-d", d / "db01.npy", *labels, "--json", d / "b.json")
    assert res.exit_code == 0, res.output
    assert json.loads((d / "a.json").read_text()) | TIMES == json.loads((d / "b.json").read_text()) | TIMES

    res = run("search", "-d", d / "trn_binary.npy", "-q", d / "tst_binary.npy", "-k", 5, "--zeros-as", zero, "--out", d / "r.npz")
    assert res.exit_code == 0, res.output
    dist = ref.distances(expected_bits(q, int(zero)), expected_bits(db, int(zero)))
    found = np.load(d / "r.npz")["indices"]
    for i in range(len(q)):
        np.testing.assert_array_equal(found[i], ref.ranking(dist[i])[:5])

    res = run("index", "build", d / "trn_binary.npy", "--out", d / "db.index", "--zeros-as", zero)
    assert res.exit_code == 0, res.output
    res = run("search", "--index", d / "db.index", "-q", d / "tst_binary.npy", "-k", 5, "--zeros-as", zero, "--out", d / "s.npz")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(d / "s.npz")["indices"], found)


@pytest.fixture
def our_files(tmp_path):
    # The query labels never use the last class: the one-hot width must still come from both files.
    q01, db01 = random_eval_files(tmp_path, seed=11, queries=9, database=60, bits=20, classes=(4, 5))
    return tmp_path, q01, db01


def export(d, *extra):
    return run("codes", "export", "--layout", "deephash", "-q", d / "q.npy", "-d", d / "db.npy",
               "--query-labels", d / "ql.npy", "--db-labels", d / "dl.npy", *extra)  # fmt: skip


def test_export_writes_their_files_and_their_map_matches_ours(our_files):
    d, q01, db01 = our_files
    res = export(d, "--out", d / "deephash")
    assert res.exit_code == 0, res.output
    out = d / "deephash"
    tst, trn = np.load(out / "tst_binary.npy"), np.load(out / "trn_binary.npy")
    tst_label, trn_label = np.load(out / "tst_label.npy"), np.load(out / "trn_label.npy")
    assert tst.dtype == trn.dtype == np.float32 and set(np.unique(tst)) == {-1.0, 1.0}
    np.testing.assert_array_equal(tst, np.where(q01 == 1, 1.0, -1.0))
    np.testing.assert_array_equal(trn, np.where(db01 == 1, 1.0, -1.0))
    assert tst_label.dtype == trn_label.dtype == np.int8 and tst_label.shape == (9, 5) and trn_label.shape == (60, 5)
    np.testing.assert_array_equal(tst_label.argmax(axis=1), np.load(d / "ql.npy"))
    assert (tst_label.sum(axis=1) == 1).all() and (trn_label.sum(axis=1) == 1).all()
    # Their CalcTopMap on their files (stable sort: ties by index, as ours) against our eval on ours.
    theirs = numpy_map(tst, trn, tst_label, trn_label, kind="stable")
    res = run("eval", "-q", d / "q.npy", "-d", d / "db.npy", "--query-labels", d / "ql.npy", "--db-labels", d / "dl.npy",
              "--json", d / "m.json")
    assert res.exit_code == 0, res.output
    assert abs(json.loads((d / "m.json").read_text())["map"] - theirs) <= 1e-12
    # And back: their float codes read as ours, bit for bit.
    np.testing.assert_array_equal(read_codes(out / "tst_binary.npy").packed, pack(q01))


def test_export_keeps_multi_hot_labels(our_files):
    d, _, _ = our_files
    multi = (np.random.default_rng(2).random((9, 6)) < 0.4).astype(np.uint8)
    np.save(d / "ql.npy", multi)
    res = run("codes", "export", "--layout", "deephash", "-q", d / "q.npy", "--query-labels", d / "ql.npy", "--out", d / "x")
    assert res.exit_code == 0, res.output
    written = np.load(d / "x" / "tst_label.npy")
    assert written.dtype == np.int64
    np.testing.assert_array_equal(written, multi)
    assert sorted(p.name for p in (d / "x").iterdir()) == ["tst_binary.npy", "tst_label.npy"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: np.save(d / "ql.npy", np.zeros(3, np.int64)), "ql.npy: 3 label rows but the codes have 9"),
        (lambda d: write_codes(d / "q.npy", np.zeros((9, 2), np.uint8), 16), "q.npy has 16-bit codes but"),
        (lambda d: np.save(d / "ql.npy", np.zeros((9, 5), np.uint8)), "labels of different kinds"),
    ],
)
def test_export_checks_everything_before_writing(our_files, change, message):
    d, _, _ = our_files
    change(d)
    (d / "out").mkdir()
    assert_one_line_error(export(d, "--out", d / "out"), message, d / "out", "*.npy")


def test_export_needs_a_folder(our_files):
    d, _, _ = our_files
    (d / "file").write_text("")
    with pytest.raises(CodesError, match="file: exists and is not a folder"):
        export_deephash(d / "file", query_codes=d / "q.npy")
    with pytest.raises(CodesError, match="nothing to export"):
        export_deephash(d / "x")
    assert_one_line_error(export(d, "--out", d / "no" / "dir"), "does not exist", d, "*_binary.npy")
