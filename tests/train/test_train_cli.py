"""`dsah-rt train` and `dsah-rt saliency` through click: outputs and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dsah_rt.cli import main
from dsah_rt.train.run_dir import CHECKPOINT, load_checkpoint, load_run

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--data", "synthetic-fg", "--data-option", "num_classes=3", "--data-option", "image_size=32",
        "--data-option", "train_per_class=4", "--data-option", "query_per_class=2",
        "--input-size", "32", "--batch-size", "6", "--device", "cpu"]  # fmt: skip


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def dsah_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "multi"
    result = _invoke("train", *TINY, "--epochs", "1", "--bits", "8", "--bits", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_sub_runs(dsah_run: Path) -> None:
    for bits in (8, 16):
        sub = dsah_run / f"bits-{bits}"
        for name in ("checkpoint.pt", "config.json", "metrics.json", "query_codes.npy", "db_codes.npy",
                     "query_labels.npy", "db_labels.npy"):  # fmt: skip
            assert (sub / name).is_file(), name
        config = json.loads((sub / "config.json").read_text())
        assert config["bits"] == bits and config["weights_source"] == "none (random init)"
        assert config["training"]["data_options"] == {"num_classes": 3, "image_size": 32, "train_per_class": 4,
                                                      "query_per_class": 2}  # fmt: skip
    assert load_run(dsah_run, bits=16)[1]["bits"] == 16


def test_train_resume_continues(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _invoke("train", *TINY, "--epochs", "1", "--method", "dpsh", "--out", str(out)).exit_code == 0
    result = _invoke("train", *TINY, "--epochs", "2", "--method", "dpsh", "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1 of 2" in result.output
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2]


def test_train_semantic_norm_reaches_the_config(tmp_path: Path) -> None:
    out = tmp_path / "abs"
    result = _invoke("train", *TINY, "--epochs", "1", "--semantic-norm", "abs", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["training"]["semantic_norm"] == "abs"


def test_train_reports_the_files_of_an_image_folder_it_skips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "notes.jpg").write_text("not an image")
    result = _invoke("train", "--data", f"imagefolder:{tmp_path / 'data'}", "--data-option", "query_per_class=2",
                     "--input-size", "32", "--batch-size", "4", "--device", "cpu", "--epochs", "1",
                     "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "skipped b/notes.jpg: not an image" in result.output


def test_train_errors_are_one_line(tmp_path: Path) -> None:
    _one_line_error(_invoke("train", *TINY, "--out", str(tmp_path / "missing"), "--resume"), "nothing to resume")
    _one_line_error(_invoke("train", "--data", "no-such-data", "--out", str(tmp_path / "x")), "no-such-data")
    _one_line_error(_invoke("train", *TINY, "--data-option", "colour=red", "--out", str(tmp_path / "x")), "colour")
    _one_line_error(_invoke("train", *TINY, "--data-option", "oops", "--out", str(tmp_path / "x")), "key=value")
    _one_line_error(_invoke("train", *TINY, "--backbone", "resnet", "--out", str(tmp_path / "x")), "resnet")
    _one_line_error(_invoke("train", *TINY, "--weights", "imagenet", "--out", str(tmp_path / "x")), "small")


@pytest.mark.parametrize("option, fragment", [
    (("--bits", "2000"), "at most 1024"), (("--input-size", "0"), "at least 32"), (("--lr", "nan"), "lr"),
    (("--weight-decay", "-1"), "weight_decay"), (("--refit-epochs", "9"), "exceed epochs"),
])  # fmt: skip
def test_bad_options_are_refused_before_any_epoch(tmp_path: Path, option: tuple[str, str], fragment: str) -> None:
    _one_line_error(_invoke("train", *TINY, "--epochs", "1", *option, "--out", str(tmp_path / "x")), fragment)
    assert not (tmp_path / "x").exists()


def test_sigterm_ends_a_run_like_ctrl_c_keeping_its_last_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("dsah-rt")), "train", *TINY, "--epochs", "500", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"Error: {out}: interrupted; its last finished epoch is saved: add --resume to continue"
    epochs = load_checkpoint(out)["epoch"]
    assert 1 <= epochs < 500


def _images(folder: Path, corrupt: bool) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (40, 50, 3)), ("b.jpg", (8, 8, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_saliency_writes_one_png_per_image(dsah_run: Path, tmp_path: Path) -> None:
    images = _images(tmp_path / "images", corrupt=True)
    out = tmp_path / "out"
    result = _invoke("saliency", str(images), "--run", str(dsah_run), "--bits", "8", "--out", str(out),
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "skipped broken.png: not an image" in result.output and "skipped notes.txt: not an image" in result.output
    assert "2 saliency images" in result.output and "(2 skipped)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png.png", "b.jpg.png"]
    with Image.open(out / "a.png.png") as img:  # three panels of the image's height, enlarged to >= 128
        width, height = img.size
    assert height == 160 and width == 3 * 200 + 8


def test_saliency_reads_folders_like_encode_and_names_never_collide(dsah_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for rel in ("img0.png", "img0.jpg", "sub/img0.png"):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / rel)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / "no_extension", format="PNG")
    out = images / "overlays"  # inside the folder: left out of the scan, so a rerun draws the same set
    for _ in range(2):
        result = _invoke("saliency", str(images), "--run", str(dsah_run), "--bits", "8", "--out", str(out),
                         "--device", "cpu")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "4 saliency images" in result.output and "skipped" not in result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["img0.jpg.png", "img0.png.png", "no_extension.png", "sub/img0.png.png"]


def test_saliency_errors(dsah_run: Path, tmp_path: Path) -> None:
    images = _images(tmp_path / "images", corrupt=True)
    out = str(tmp_path / "out")
    _one_line_error(_invoke("saliency", str(images / "broken.png"), "--run", str(dsah_run), "--bits", "8",
                            "--out", out), "broken.png")  # fmt: skip
    _one_line_error(_invoke("saliency", str(images), "--run", str(dsah_run), "--out", out), "8, 16 bits")
    only_notes = tmp_path / "notes"
    only_notes.mkdir()
    (only_notes / "notes.txt").write_text("not an image")
    result = _invoke("saliency", str(only_notes), "--run", str(dsah_run), "--bits", "8", "--out", out)
    assert result.exit_code == 1
    assert "no images found (skipped notes.txt: not an image" in result.output.splitlines()[-1]
    _one_line_error(_invoke("saliency", str(images), "--run", str(tmp_path), "--out", out), "not a dsah-rt run")
    dpsh = tmp_path / "dpsh"
    assert _invoke("train", *TINY, "--epochs", "1", "--method", "dpsh", "--out", str(dpsh)).exit_code == 0
    _one_line_error(_invoke("saliency", str(images), "--run", str(dpsh), "--out", out), "DSaH run")


def test_train_help_names_deephash_pytorch_splits() -> None:
    from dsah_rt.train.data.cifar10 import DEEPHASH_PROTOCOLS, PROTOCOLS

    text = " ".join(_invoke("train", "--help").output.split())
    for name in DEEPHASH_PROTOCOLS:
        assert name in text and name in PROTOCOLS
