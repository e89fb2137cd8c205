"""The streaming encoder: rows, skips, determinism, atomic output, resume, strict, and the CLI."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from dsah_fixtures import BITS, INPUT_SIZE
from PIL import Image

from dsah_rt.cli import main
from dsah_rt.codes import manifest_path, read_codes
from dsah_rt.encode import EncodeError, encode_folder, state_path
from dsah_rt.errors import UserError
from dsah_rt.images import decode_image
from dsah_rt.runners import Runner, make_runner

GOOD = 14


@pytest.fixture(scope="module")
def ort(model):
    with make_runner(model[1], "ort-cpu") as runner:
        yield runner


class Counting(Runner):
    """Delegates to a real runner, counting the images it encodes; can fail after `fail_after` calls."""

    def __init__(self, inner: Runner, fail_after: int | None = None) -> None:
        super().__init__(inner.info, inner.source)
        self.backend = inner.backend
        self.inner, self.fail_after, self.calls, self.images = inner, fail_after, 0, 0

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        pass

    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        self.images += len(images)
        return self.inner._run(images, with_u)

    def _describe(self) -> dict[str, Any]:
        return self.inner._describe()


def _counting(ort: Runner, fail_after: int | None = None) -> Counting:
    runner = Counting(ort, fail_after)
    runner.activate()
    return runner


def _write_image(path: Path, seed: int, fmt: str = "JPEG") -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 90, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def make_folder(root: Path) -> tuple[list[str], list[str]]:
    """GOOD decodable images (nested, mixed sizes and formats) and some bad files: (good, bad) rel paths."""
    good = [f"{'sub/' if i % 3 else ''}img{i:02d}.{'png' if i % 4 == 0 else 'jpg'}" for i in range(GOOD)]
    for i, rel in enumerate(good):
        _write_image(root / rel, i, "PNG" if rel.endswith("png") else "JPEG")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="JPEG")
    (root / "sub" / "cut.jpg").write_bytes(buf.getvalue()[:300])
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    return good, ["dangling.png", "empty.jpg", "notes.txt", "sub/cut.jpg"]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    good, bad = make_folder(root)
    return root, good, bad


def _sorted(rels: list[str]) -> list[str]:
    return sorted(rels, key=os.fsencode)


def _candidates(good: list[str], bad: list[str]) -> list[str]:
    """The files the decoder sees, in order (the scan itself skips the dangling symlink)."""
    return _sorted(good + [b for b in bad if b != "dangling.png"])


def test_rows_codes_and_skips(folder, ort, tmp_path):
    root, good, bad = folder
    out = tmp_path / "codes.npy"
    seen = []
    result = encode_folder(root, out, ort, batch=4, progress=lambda done, total: seen.append((done, total)))
    codes = read_codes(out)
    assert codes.rows == result.rows == _sorted(good)
    assert codes.bits == BITS and codes.model["fingerprint"] == ort.info.fingerprint
    assert [s["path"] for s in codes.skipped] == bad and all(s["reason"] for s in codes.skipped)
    # Each row's code is what the runner gives for that file decoded on its own.
    alone = np.concatenate([ort.infer(decode_image(root / rel, INPUT_SIZE)[None]) for rel in codes.rows])
    np.testing.assert_array_equal(codes.packed, alone)
    assert seen[-1] == (GOOD + 3, GOOD + 3) and seen == sorted(seen)  # the symlink is skipped by the scan
    assert not state_path(out).exists()


def test_output_is_deterministic_across_runs_and_pools(folder, ort, tmp_path):
    root, *_ = folder
    outs = []
    for i, (pool, workers, batch) in enumerate([("thread", 2, 4), ("thread", 1, 32), ("process", 2, 5)]):
        out = tmp_path / f"codes{i}.npy"
        encode_folder(root, out, ort, batch=batch, workers=workers, pool=pool)
        outs.append((out.read_bytes(), json.loads(manifest_path(out).read_text())))
    assert outs[0] == outs[1] == outs[2]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith("codes"))


def test_a_failure_midway_leaves_no_codes_and_resume_equals_an_uninterrupted_run(folder, ort, tmp_path):
    root, good, bad = folder
    full = tmp_path / "full" / "codes.npy"
    full.parent.mkdir()
    encode_folder(root, full, _counting(ort), batch=4)

    out_dir = tmp_path / "resumed"
    out_dir.mkdir()
    out = out_dir / "codes.npy"
    with pytest.raises(RuntimeError, match="injected failure"):
        encode_folder(root, out, _counting(ort, fail_after=2), batch=4, checkpoint_seconds=0)
    assert _leftovers(out_dir) == ["codes.npy.partial"]  # no codes, no manifest, no temporary file
    # One segment per checkpoint, each holding only what that checkpoint added.
    segments = sorted(p.name for p in state_path(out).iterdir())
    assert segments == ["entries-000000.json", "entries-000001.json", "state.json"]
    assert len(json.loads((state_path(out) / "entries-000001.json").read_text())) == 4

    resumed = _counting(ort)
    result = encode_folder(root, out, resumed, batch=4, resume=True)
    finished = _candidates(good, bad)[:8]  # the two chunks of 4 files done before the failure
    assert result.reused == 8
    assert resumed.images == GOOD - len(set(finished) & set(good))  # nothing finished is encoded again
    assert out.read_bytes() == full.read_bytes()
    assert json.loads(manifest_path(out).read_text()) == json.loads(manifest_path(full).read_text())
    assert _leftovers(out_dir) == ["codes.npy", "codes.npy.json"]


def test_resume_re_encodes_a_file_changed_since_the_interruption(folder, ort, tmp_path):
    root, good, bad = folder
    out = tmp_path / "codes.npy"
    with pytest.raises(RuntimeError):
        encode_folder(root, out, _counting(ort, fail_after=1), batch=4, checkpoint_seconds=0)
    finished = [rel for rel in _candidates(good, bad)[:4] if rel in good]
    changed = finished[0]
    _write_image(root / changed, seed=999, fmt="PNG" if changed.endswith("png") else "JPEG")
    resumed = _counting(ort)
    encode_folder(root, out, resumed, batch=4, resume=True)
    assert resumed.images == GOOD - len(finished) + 1
    full = tmp_path / "full.npy"
    encode_folder(root, full, ort, batch=4)
    assert out.read_bytes() == full.read_bytes()


def test_without_resume_a_stale_partial_state_is_discarded(folder, ort, tmp_path):
    root, *_ = folder
    out = tmp_path / "codes.npy"
    with pytest.raises(RuntimeError):
        encode_folder(root, out, _counting(ort, fail_after=1), batch=4, checkpoint_seconds=0)
    messages, fresh = [], _counting(ort)
    encode_folder(root, out, fresh, batch=4, log=messages.append)
    assert fresh.images == GOOD and "discarding the partial state" in messages[0]
    assert not state_path(out).exists() and out.exists()


def test_resume_refuses_a_state_from_another_backend(folder, ort, model, tmp_path):
    root, *_ = folder
    out = tmp_path / "codes.npy"
    with pytest.raises(RuntimeError):
        encode_folder(root, out, _counting(ort, fail_after=1), batch=4, checkpoint_seconds=0)
    with make_runner(model[0], "torch") as torch_runner, pytest.raises(EncodeError, match="another model or backend"):
        encode_folder(root, out, torch_runner, resume=True)


def test_strict_fails_on_any_skip_and_writes_nothing(folder, ort, tmp_path):
    root, *_ = folder
    out = tmp_path / "codes.npy"
    with pytest.raises(EncodeError, match=r"--strict: 4 of 18 files skipped: dangling.png: broken symlink"):
        encode_folder(root, out, ort, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no codes, no partial state, no lock
    result = encode_folder(root, out, ort)
    assert len(result.rows) == GOOD and out.exists()


def test_nothing_encodable_and_empty_folder(ort, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("text")
    with pytest.raises(EncodeError, match="no image could be encoded"):
        encode_folder(bad, tmp_path / "codes.npy", ort)
    assert not (tmp_path / "codes.npy").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncodeError, match="empty folder"):
        encode_folder(tmp_path / "empty", tmp_path / "codes.npy", ort)


def test_missing_output_folder_fails_before_any_work(folder, ort, tmp_path):
    runner = _counting(ort)
    with pytest.raises(UserError, match="does not exist"):
        encode_folder(folder[0], tmp_path / "missing" / "codes.npy", runner)
    assert runner.calls == 0


def test_output_inside_the_image_folder_is_not_scanned(folder, ort):
    root, good, bad = folder
    for _ in range(2):
        result = encode_folder(root, root / "codes.npy", ort)
    assert result.rows == _sorted(good) and [s.path for s in result.skipped] == bad


def test_a_single_file_and_non_utf8_names(ort, tmp_path):
    root = tmp_path / "imgs"
    _write_image(root / "a.jpg", 0)
    name = os.fsencode(root) + b"/\xe9t\xe9.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(buf, format="JPEG")
    with open(name, "wb") as fh:
        fh.write(buf.getvalue())
    result = encode_folder(root, tmp_path / "codes.npy", ort)
    assert [os.fsencode(r) for r in read_codes(tmp_path / "codes.npy").rows] == [b"a.jpg", b"\xe9t\xe9.jpg"]
    one = encode_folder(root / "a.jpg", None, ort)
    np.testing.assert_array_equal(one.codes, result.codes[:1])


# ------------------------------------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_encode_exit_codes(folder, model, tmp_path):
    root, good, bad = folder
    with open(os.fsencode(root) + b"/bad-\xff.jpg", "wb") as fh:
        fh.write(b"garbage")
    out = tmp_path / "codes.npy"
    ok = _cli("encode", root, "--out", out, "--model", model[1], "--batch", "4")
    assert ok.exit_code == 0, ok.output
    assert f"{GOOD} images encoded, {len(bad) + 1} skipped" in ok.output and "images/s" in ok.output
    assert "skipped bad-\\xff.jpg: not an image" in ok.output

    strict = _cli("encode", root, "--out", tmp_path / "strict.npy", "--model", model[1], "--strict")
    assert strict.exit_code == 1 and "--strict" in strict.output and "Traceback" not in strict.output

    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.jpg").write_bytes(b"")
    nothing = _cli("encode", tmp_path / "none", "--out", tmp_path / "n.npy", "--model", model[1])
    assert nothing.exit_code == 1 and "no image could be encoded" in nothing.output


def test_cli_encode_refuses_bad_models_and_sizes(folder, model, tmp_path):
    root, *_ = folder
    fake = tmp_path / "fake.onnx"
    fake.write_text("not a model")
    for args, message in [
        (["--model", fake], "not a loadable ONNX model"),
        (["--model", model[1], "--size", "64"], f"model takes {INPUT_SIZE} px images but --size 64 was requested"),
    ]:
        result = _cli("encode", root, "--out", tmp_path / "c.npy", *args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) <= 2 and not (tmp_path / "c.npy").exists()
    missing = _cli("encode", root, "--out", tmp_path / "no" / "c.npy", "--model", model[1])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_cli_search_by_image(folder, model, tmp_path):
    root, good, bad = folder
    db = tmp_path / "db.npy"
    assert _cli("encode", root, "--out", db, "--model", model[1]).exit_code == 0
    query = good[5]
    # k = the whole database: an untrained model gives many images the same code, so the query
    # itself may tie at distance 0 with rows ranked before it.
    res = _cli("search", "--db-codes", db, "--query", root / query, "--model", model[1], "-k", GOOD, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == str(root / query) and len(lines) == 1 + GOOD
    result = json.loads((tmp_path / "r.json").read_text())
    hits = result["queries"][0]["neighbours"]
    assert [h["rank"] for h in hits] == list(range(1, GOOD + 1))
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert sorted(h["path"] for h in hits) == sorted(good)
    assert any(h["path"] == query and h["distance"] == 0 for h in hits)
    assert f"{hits[0]['distance']:>4}  {hits[0]['path']}" in lines[1]

    folder_res = _cli("search", "--db-codes", db, "--query", root, "--model", model[1], "-k", 1, "--json", tmp_path / "all.json")
    every = json.loads((tmp_path / "all.json").read_text())
    assert folder_res.exit_code == 0 and len(every["queries"]) == GOOD and len(every["skipped"]) == len(bad)
    assert all(q["neighbours"][0]["distance"] == 0 for q in every["queries"])


def test_cli_search_refuses_codes_of_another_model(folder, model, tmp_path):
    from dsah_rt.codes import write_codes

    root, *_ = folder
    other = tmp_path / "other.npy"
    write_codes(other, np.zeros((3, 2), np.uint8), BITS, ["a", "b", "c"], model={"fingerprint": "f" * 64})
    res = _cli("search", "--db-codes", other, "--query", root, "--model", model[1], "-k", 2)
    assert res.exit_code == 1 and "encoded by another model" in res.output
    both = _cli("search", "--db-codes", other, "--query", root, "--query-codes", other, "--model", model[1])
    assert both.exit_code == 1 and "exactly one of --query-codes and --query" in both.output
    no_model = _cli("search", "--db-codes", other, "--query", root)
    assert no_model.exit_code == 1 and "--query needs --model" in no_model.output


def test_an_input_image_is_never_the_output(folder, ort, tmp_path):
    root, good, _ = folder
    image = root / good[0]
    before = image.read_bytes()
    for source in (root, image):  # an image under the folder, or the single input file itself
        with pytest.raises(UserError, match="choose another output path"):
            encode_folder(source, image, ort)
    assert image.read_bytes() == before and not list(root.rglob("*.partial*"))
