"""The public API: lazy top-level names, `python -m dsah_rt`, py.typed, and the README's examples, run."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dsah_rt
import reference as ref

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "numba", "onnxruntime", "torch")


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_import_loads_nothing_heavy_until_a_name_is_used():
    out = _fresh(f"import sys, dsah_rt; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.strip() == "[]"
    out = _fresh(f"import sys, dsah_rt; dsah_rt.read_codes; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert "numpy" in out and "torch" not in out


def test_every_public_name_is_the_defining_module_object():
    for name in dsah_rt.__all__:
        if name == "__version__":
            continue
        module = importlib.import_module(dsah_rt._API[name])
        assert getattr(dsah_rt, name) is getattr(module, name), name
        assert name in dir(dsah_rt)
    assert {"BinaryIndex", "evaluate", "read_codes", "write_codes", "make_runner", "encode_folder",
            "search_images", "index_factory", "load_index", "Evaluation"} <= set(dsah_rt.__all__)  # fmt: skip
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsah_rt.nope  # noqa: B018


def test_python_m_runs_the_command_line():
    res = subprocess.run([sys.executable, "-m", "dsah_rt", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "Usage: dsah-rt" in res.stdout and "eval" in res.stdout
    res = subprocess.run([sys.executable, "-m", "dsah_rt", "eval", "-q", "missing.npy", "-d", "x.npy",
                          "--query-labels", "a.npy", "--db-labels", "b.npy"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert res.returncode == 1 and res.stderr.strip() == "Error: missing.npy: no such file"


def test_py_typed_ships():
    assert (Path(dsah_rt.__file__).parent / "py.typed").is_file()
    assert 'dsah_rt = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_evaluation_is_typed_and_its_dict_is_the_eval_json():
    rng = np.random.default_rng(1)
    q, db = rng.integers(0, 2, (4, 16)), rng.integers(0, 2, (30, 16))
    result = dsah_rt.evaluate(q, db, rng.integers(0, 3, 4), rng.integers(0, 3, 30), bits=16)
    assert isinstance(result, dsah_rt.Evaluation)
    with pytest.raises(AttributeError):
        result.map = 0.0  # frozen
    as_dict = result.to_dict()
    assert as_dict["format"] == "dsah-rt-eval/1" and as_dict["map"] == result.map
    assert list(as_dict)[1:] == [f.name for f in dataclasses.fields(result)]


def readme_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_examples_run(tmp_path, model, monkeypatch, capsys):
    codes_example, image_example = readme_examples()
    monkeypatch.chdir(tmp_path)
    exec(compile(codes_example, "README.md (codes)", "exec"), {})
    printed = capsys.readouterr().out
    assert re.fullmatch(r"MAP@all 0\.\d{3}, tie-aware 0\.\d{3}\n", printed), printed
    assert (tmp_path / "db.npy.json").is_file() and (tmp_path / "db.index").is_file()

    _, onnx_path = model
    shutil.copy(onnx_path, tmp_path / "model.onnx")
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    exec(compile(image_example, "README.md (images)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 images encoded, 0 skipped") and len(lines) == 5
    # The queries are the database's own files: their hits are the reference ranking of its codes.
    db = dsah_rt.read_codes(tmp_path / "photos.npy")
    bits01 = np.unpackbits(db.packed, axis=1, count=db.bits)
    dist = ref.distances(bits01, bits01)
    for line in lines[1:]:
        path, hits = line.split(" ", 1)
        row = db.rows.index(Path(path).name)
        assert ast.literal_eval(hits) == [db.rows[j] for j in ref.ranking(dist[row])[:3]]
