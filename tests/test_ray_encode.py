"""`encode --engine ray` on a real local Ray (2 CPUs): the rows, codes and skips of `encode_folder`,
from a folder or a list file, and none lost when a worker dies."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from test_encode import make_folder

from dsah_rt.cli import main
from dsah_rt.codes import manifest_path, read_codes
from dsah_rt.encode import EncodeError, encode_folder
from dsah_rt.runners import make_runner

ray = pytest.importorskip("ray", reason="the `ray` extra (ray[data]) is not installed")
ray_encode = pytest.importorskip("dsah_rt.ray_encode")


@pytest.fixture(scope="module")
def fuse(tmp_path_factory):
    """The file whose removal kills a worker once (ray_encode.DIE_ONCE_ENV); a test creates it to arm it."""
    return tmp_path_factory.mktemp("fuse") / "die-once"


@pytest.fixture(scope="module")
def local_ray(fuse):
    # One Ray for the module: starting one costs seconds; encode_ray reuses a running one. Every
    # worker gets the fuse's path, which stays harmless while the file does not exist.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {ray_encode.DIE_ONCE_ENV: str(fuse)}})
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


def test_a_killed_worker_does_not_lose_rows(local_ray, fuse, ort, model, tmp_path):
    root = tmp_path / "images"
    good, bad = make_folder(root)
    single, distributed = tmp_path / "single.parquet", tmp_path / "ray.parquet"
    encode_folder(root, single, ort, batch=4)
    fuse.write_bytes(b"")  # the first batch a worker takes removes it and kills that worker (os._exit)
    result = _ray(root, distributed, ort, model)
    assert not fuse.exists(), "no worker died: the test proved nothing"
    a, b = read_codes(single), read_codes(distributed)
    # Every file exactly once, with the single process's code: the dead worker's batch was run again.
    assert b.rows == a.rows == result.rows and len(set(b.rows)) == len(good)
    assert (b.packed == a.packed).all()
    assert _manifest(distributed) == _manifest(single)


def _codes_by_path(root, ort):
    alone = encode_folder(root, None, ort, batch=4)
    return dict(zip(alone.rows, alone.codes))


def test_a_list_file_of_paths_and_uris(local_ray, ort, model, tmp_path):
    root = tmp_path / "images"
    good, _ = make_folder(root)
    listed = [str(root / good[0]), f"file://{root / good[1]}", f"images/{good[2]}", *(str(root / g) for g in good[3:6])]
    missing, text, unknown = str(root / "missing.jpg"), str(root / "notes.txt"), "nosuchfs://bucket/a.jpg"
    listing = tmp_path / "paths.txt"
    lines = ["# images to encode", "", *listed[:3], "   ", missing, *listed[3:], text, unknown, listed[0]]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "codes.parquet"
    result = _ray(listing, out, ort, model)
    codes = read_codes(out)
    # The entries as written, in the list's order, each once; comments, blanks and the repeat dropped.
    assert codes.rows == result.rows == listed
    single = _codes_by_path(root, ort)
    assert (codes.packed == np.stack([single[g] for g in good[:6]])).all()
    reasons = {s["path"]: s["reason"] for s in codes.skipped}
    assert sorted(reasons) == sorted([missing, text, unknown])
    assert reasons[missing] == "no such file"
    assert reasons[text].startswith("not an image")
    assert reasons[unknown].startswith("cannot read: ") and "\n" not in reasons[unknown]
    assert result.encoded == len(listed) + 3 and _manifest(out)["count"] == len(listed)


def test_a_list_file_with_no_entries_is_one_line(local_ray, ort, model, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text("# nothing yet\n\n")
    with pytest.raises(EncodeError, match=r"paths\.txt: no paths listed"):
        _ray(listing, tmp_path / "codes.parquet", ort, model)
    assert not (tmp_path / "codes.parquet").exists()


def test_the_single_engine_refuses_a_list_file(model, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text("/data/a.jpg\n")
    args = ["encode", str(listing), "--out", str(tmp_path / "c.parquet"), "--model", str(model[1])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "paths.txt: a list of paths (.txt) is read by --engine ray only" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_batch_that_kills_every_worker_fails_in_one_line(local_ray, fuse, ort, model, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_encode, "TASK_RETRIES", 1)  # each restart costs seconds here
    root = tmp_path / "images"
    make_folder(root)
    out = tmp_path / "codes.parquet"
    stop = threading.Event()

    def rearm():  # every batch now kills its worker: retries run out instead of looping forever
        while not stop.is_set():
            fuse.touch()
            time.sleep(0.05)

    rearming = threading.Thread(target=rearm, daemon=True)
    rearming.start()
    try:
        with pytest.raises(EncodeError, match=r"images: a Ray worker died on one batch 2 times") as failure:
            _ray(root, out, ort, model)
    finally:
        stop.set()
        rearming.join()
        fuse.unlink(missing_ok=True)
    assert "\n" not in str(failure.value) and not out.exists()
