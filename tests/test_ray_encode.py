"""`encode --engine ray` on a real local Ray (2 CPUs): the rows, codes and skips of `encode_folder`."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from test_encode import make_folder

from dsah_rt.cli import main
from dsah_rt.codes import manifest_path, read_codes
from dsah_rt.encode import encode_folder
from dsah_rt.runners import make_runner

ray = pytest.importorskip("ray", reason="the `ray` extra (ray[data]) is not installed")
ray_encode = pytest.importorskip("dsah_rt.ray_encode")


@pytest.fixture(scope="module")
def local_ray():
    # One Ray for the module: starting one costs seconds; encode_ray reuses a running one.
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ort(model):
    with make_runner(model[1], "ort-cpu") as runner:
        yield runner


def _manifest(path):
    return json.loads(manifest_path(path).read_text())


def _ray(root, out, ort, model, **kwargs):
    return ray_encode.encode_ray(root, out, ort, model[1], backend="ort-cpu", batch=4, workers=2, **kwargs)


def test_codes_and_skips_equal_the_single_process_run(local_ray, ort, model, tmp_path):
    root = tmp_path / "images"
    good, bad = make_folder(root)
    single, distributed = tmp_path / "single.parquet", tmp_path / "ray.parquet"
    encode_folder(root, single, ort, batch=4)
    result = _ray(root, distributed, ort, model)
    a, b = read_codes(single), read_codes(distributed)
    assert b.rows == a.rows == result.rows and len(b.rows) == len(good)
    assert (b.packed == a.packed).all()
    assert [s["path"] for s in b.skipped] == bad
    # The whole manifest, skip reasons and the model record written by the workers included.
    assert _manifest(distributed) == _manifest(single)
    assert result.encoded == len(good) + len(bad) - 1  # the dangling symlink is skipped by the scan


def test_resume_encodes_only_the_files_not_yet_in_the_output(local_ray, ort, model, tmp_path):
    root = tmp_path / "images"
    good, _ = make_folder(root)
    later = tmp_path / "later"
    later.mkdir()
    for rel in good[:5]:
        shutil.move(root / rel, later / rel.replace("/", "_"))
    out = tmp_path / "codes.parquet"
    _ray(root, out, ort, model)
    for name in sorted(p.name for p in later.iterdir()):
        shutil.move(later / name, root / name)
    resumed = _ray(root, out, ort, model, resume=True)
    assert resumed.reused == len(good) - 5 and resumed.encoded == 5 + 3  # the bad files are tried again
    full = tmp_path / "full.parquet"
    encode_folder(root, full, ort, batch=4)
    assert _manifest(out) == _manifest(full)
    assert read_codes(out).rows == read_codes(full).rows


def test_cli_engine_ray_writes_what_the_single_engine_writes(local_ray, model, tmp_path):
    root = tmp_path / "images"
    make_folder(root)
    outs = {}
    for engine in ("single", "ray"):
        outs[engine] = tmp_path / f"{engine}.parquet"
        args = ["encode", str(root), "--out", str(outs[engine]), "--model", str(model[1]), "--backend", "ort-cpu"]
        result = CliRunner().invoke(main, [*args, "--engine", engine, "--batch", "4"])
        assert result.exit_code == 0, result.output
    assert _manifest(outs["ray"]) == _manifest(outs["single"])


def test_ray_options_need_the_ray_engine(model, tmp_path):
    args = ["encode", str(tmp_path), "--out", str(tmp_path / "c.parquet"), "--model", str(model[1]), "--ray-address", "auto"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--ray-address needs --engine ray" in result.output
