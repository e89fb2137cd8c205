"""`dsah-rt eval` and `dsah-rt search` through click's test runner, good and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import reference as ref
from cli_checks import assert_one_line_error, random_eval_files
from dsah_rt.cli import main


@pytest.fixture
def files(tmp_path):
    q01, db01 = random_eval_files(tmp_path, seed=0, queries=6, database=50, bits=12)
    np.save(tmp_path / "pm1.npy", q01.astype(np.int8) * 2 - 1)  # ±1 form, no manifest
    return tmp_path, q01, db01


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_prints_table_and_writes_json(files):
    d, q01, db01 = files
    res = run("eval", "--query-codes", d / "q.npy", "--db-codes", d / "db.npy", "--query-labels", d / "ql.npy",
              "--db-labels", d / "dl.npy", "--json", d / "m.json")
    assert res.exit_code == 0, res.output
    assert "MAP@all" in res.output
    out = json.loads((d / "m.json").read_text())
    for key in ["map", "map_tie_aware", "map_tie_best", "map_tie_worst", "precision_at_radius", "queries",
                "database", "bits", "topk", "seconds"]:
        assert key in out
    dist = ref.distances(q01, db01)
    rel = ref.relevance(np.load(d / "ql.npy"), np.load(d / "dl.npy"))
    expected = np.mean([ref.average_precision(rel[i][ref.ranking(dist[i])]) for i in range(6)])
    ref.assert_close(out["map"], expected)
    assert out["queries"] == 6 and out["database"] == 50 and out["bits"] == 12 and out["topk"] == 0


def test_eval_accepts_pm1_queries_against_packed_database(files):
    d, _, _ = files
    a = run("eval", "-q", d / "q.npy", "-d", d / "db.npy", "--query-labels", d / "ql.npy", "--db-labels", d / "dl.npy", "--json", d / "a.json")
    b = run("eval", "-q", d / "pm1.npy", "-d", d / "db.npy", "--query-labels", d / "ql.npy", "--db-labels", d / "dl.npy", "--json", d / "b.json")
    assert a.exit_code == b.exit_code == 0
    assert json.loads((d / "a.json").read_text())["map"] == json.loads((d / "b.json").read_text())["map"]


def test_search_writes_npz(files):
    d, q01, db01 = files
    res = run("search", "--db-codes", d / "db.npy", "--query-codes", d / "q.npy", "-k", 7, "--out", d / "r.npz")
    assert res.exit_code == 0, res.output
    r = np.load(d / "r.npz")
    assert r["indices"].dtype == np.int64 and r["distances"].dtype == np.int32 and r["indices"].shape == (6, 7)
    dist = ref.distances(q01, db01)
    for i in range(6):
        np.testing.assert_array_equal(r["indices"][i], ref.ranking(dist[i])[:7])
    assert float(r["seconds"]) >= 0


def _bad(tmp_path):
    np.save(tmp_path / "short_labels.npy", np.array([0, 1]))
    np.save(tmp_path / "codes24.npy", np.zeros((6, 3), np.uint8))
    np.save(tmp_path / "float_labels.npy", np.full(6, 0.5))
    np.save(tmp_path / "rank3.npy", np.zeros((6, 2, 2)))
    (tmp_path / "garbage.npy").write_bytes(b"\x00garbage")
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "-q", "{d}/missing.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy"], "missing.npy: no such file"),
        (["eval", "-q", "{d}/q.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/short_labels.npy", "--db-labels", "{d}/dl.npy"], "short_labels.npy: 2 label rows but the codes have 6"),
        (["eval", "-q", "{d}/codes24.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy"], "codes24.npy has 24-bit codes but"),
        (["eval", "-q", "{d}/q.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/float_labels.npy", "--db-labels", "{d}/dl.npy"], "float_labels.npy: class ids must be integers"),
        (["eval", "-q", "{d}/rank3.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy", "--bits", "12"], "rank3.npy: expected a 2-D array"),
        (["eval", "-q", "{d}/garbage.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy"], "garbage.npy: not a readable .npy"),
        (["eval", "-q", "{d}/q.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy", "--bits", "16"], "--bits 16 disagrees"),
        (["eval", "-q", "{d}/q.npy", "-d", "{d}/db.npy", "--query-labels", "{d}/ql.npy", "--db-labels", "{d}/dl.npy", "--json", "{d}/no/dir/m.json"], "does not exist"),
        (["search", "-d", "{d}/db.npy", "-q", "{d}/q.npy", "-k", "51", "--out", "{d}/r.npz"], "-k 51 must be between 1 and the database size 50"),
        (["search", "-d", "{d}/db.npy", "-q", "{d}/codes24.npy", "-k", "5", "--out", "{d}/r.npz"], "packed rows have 3 bytes but 12 bits need 2"),
        (["search", "-d", "{d}/db.npy", "-q", "{d}/q.npy", "-k", "5", "--out", "{d}/missing/r.npz"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_error(files, args, message):
    d = _bad(files[0])
    assert_one_line_error(run(*[a.format(d=d) for a in args]), message, d, "r.npz")


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, time; t=time.time(); from dsah_rt.cli import main; import dsah_rt.metrics, dsah_rt.index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "dsah_rt.cli", "--help"], capture_output=True, text=True, check=True)
    assert "eval" in res.stdout and "search" in res.stdout


def test_help_of_the_group_and_of_every_command_imports_no_heavy_package():
    """`--help` is answered from click alone: numpy, numba, torch, onnxruntime and ray load only when a command runs."""
    code = """
import json, sys
import click
from dsah_rt.cli import main
for args in [[], *([name] for name in main.list_commands(click.Context(main)))]:
    try:
        main([*args, "--help"], prog_name="dsah-rt")
    except SystemExit:
        pass
    heavy = [m for m in ("numpy", "numba", "torch", "onnxruntime", "ray") if m in sys.modules]
    if heavy:  # the first one to load them: later commands would be blamed for its imports
        print(json.dumps({" ".join(args) or "(the group)": heavy}))
        break
else:
    print(json.dumps({}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {}


@pytest.mark.parametrize("command, victim", [
    (["eval", "-q", "q.npy", "-d", "db.npy", "--query-labels", "ql.npy", "--db-labels", "dl.npy", "--json", "dl.npy"], "dl.npy"),
    (["search", "-q", "q.npy", "-d", "db.npy", "-k", "3", "--out", "db.npy"], "db.npy"),
    (["search", "-q", "q.npy", "-d", "db.npy", "-k", "3", "--out", "link.npy"], "q.npy"),  # a symlink to an input
    (["index", "build", "db.npy", "--out", "db.npy"], "db.npy"),
])  # fmt: skip
def test_an_input_is_never_an_output(tmp_path, monkeypatch, command: list[str], victim: str) -> None:
    random_eval_files(tmp_path, seed=3, queries=4, database=20, bits=12)
    (tmp_path / "link.npy").symlink_to(tmp_path / "q.npy")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / victim).read_bytes()
    res = CliRunner().invoke(main, command)
    assert_one_line_error(res, "is also an input of this command", tmp_path, "*.npz")
    assert (tmp_path / victim).read_bytes() == before
