"""Folder scan and image decoding: every bad input from the issue, each written by the test."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import write_png16
from PIL import Image

from dsah_rt.images import ImageSkip, decode, decode_batch, decode_image, find_images, resize, scan, skip_reason

S = 16


def _rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def _expected(img: Image.Image) -> np.ndarray:
    """What decode should give for an upright RGB image: bilinear resize to S x S, CHW."""
    return np.asarray(img.convert("RGB").resize((S, S), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def _reason(path: Path, **kw) -> str:
    with pytest.raises(ImageSkip) as info:
        decode_image(path, S, **kw)
    return str(info.value)


# ------------------------------------------------------------------------------------ good files


def test_rgb_is_resized_bilinear_to_chw(tmp_path):
    img = Image.fromarray(_rgb())
    out = decode_image(_save(tmp_path / "a.png", img), S)
    assert out.dtype == np.uint8 and out.shape == (3, S, S) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _expected(img))


def test_image_at_model_size_is_not_resampled(tmp_path):
    arr = _rgb(S, S)
    np.testing.assert_array_equal(decode_image(_save(tmp_path / "a.png", Image.fromarray(arr)), S), arr.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_any_mode_becomes_rgb_like_the_training_loader(tmp_path, mode):
    img = Image.fromarray(_rgb()).convert(mode)
    out = decode_image(_save(tmp_path / "a.png", img), S)
    np.testing.assert_array_equal(out, _expected(img))  # alpha dropped, palette expanded
    if mode in ("L", "LA", "1"):
        assert (out[0] == out[1]).all() and (out[1] == out[2]).all()


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(_rgb()).convert("P")
    out = decode_image(_save(tmp_path / "a.png", img, transparency=0), S)
    np.testing.assert_array_equal(out, _expected(img))


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(np.full((24, 24, 3), (200, 40, 90), np.uint8))
    path = _save(tmp_path / "cmyk.jpg", rgb.convert("CMYK"), quality=98)
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path, S).astype(int)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), [200, 40, 90], atol=6)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    grey16 = np.linspace(0, 65535, S * S).reshape(S, S).astype(np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(grey16))
    assert Image.open(path).mode.startswith("I;16")
    out = decode_image(path, S)
    np.testing.assert_array_equal(out[0], (grey16 >> 8).astype(np.uint8))
    assert out.max() == 255 and out.min() == 0 and len(np.unique(out)) > 200  # Pillow's convert would clip to 255


def test_animated_gif_gives_the_first_frame(tmp_path):
    first, second = np.zeros((S, S, 3), np.uint8), np.full((S, S, 3), 255, np.uint8)
    frames = [Image.fromarray(first).convert("P"), Image.fromarray(second).convert("P")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    np.testing.assert_array_equal(decode_image(path, S), first.transpose(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path):
    arr = _rgb(S, 2 * S)  # landscape pixels, stored with "rotate 90 clockwise to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.png", Image.fromarray(arr), exif=exif)
    upright = Image.fromarray(np.rot90(arr, k=-1))
    np.testing.assert_array_equal(decode_image(path, S), _expected(upright))


def test_one_by_one_image(tmp_path):
    path = _save(tmp_path / "dot.png", Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)))
    out = decode_image(path, S)
    assert out.shape == (3, S, S)
    np.testing.assert_array_equal(out[:, 0, 0], [10, 20, 30])
    assert (out == out[:, :1, :1]).all()


@pytest.mark.parametrize("name, fmt", [("really_png.jpg", "PNG"), ("really_jpeg.png", "JPEG"), ("no_extension", "PNG")])
def test_wrong_or_missing_extension_still_decodes(tmp_path, name, fmt):
    img = Image.fromarray(_rgb())
    right = _save(tmp_path / f"right.{fmt.lower()}", img, format=fmt)
    wrong = _save(tmp_path / name, img, format=fmt)
    np.testing.assert_array_equal(decode_image(wrong, S), decode_image(right, S))


# --------------------------------------- decode and resize: the pipeline training shares with encode


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2).astype(np.uint8)


def test_decode_gives_hwc_rgb_and_decode_image_is_its_resize(tmp_path):
    img = Image.fromarray(_rgb())
    path = _save(tmp_path / "a.png", img)
    out = decode(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, np.asarray(img))
    np.testing.assert_array_equal(decode(path.read_bytes()), out)  # bytes decode like the file
    np.testing.assert_array_equal(decode_image(path, S), resize(out, S).transpose(2, 0, 1))


def test_resize_is_pillow_bilinear_on_uint8():
    arr = _rgb(37, 53)
    out = resize(arr, S)
    assert out.dtype == np.uint8 and out.shape == (S, S, 3)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(arr).resize((S, S), Image.Resampling.BILINEAR)))
    np.testing.assert_array_equal(resize(arr[::2, ::3], S), resize(np.ascontiguousarray(arr[::2, ::3]), S))
    np.testing.assert_array_equal(resize(_rgb(S, S), S), _rgb(S, S))
    with pytest.raises(ValueError, match="uint8"):
        resize(arr.astype(np.float32), S)


def test_16_bit_grey_png_keeps_the_high_byte(tmp_path):
    grey16 = np.array([[0, 255, 256, 32768], [40000, 65279, 65280, 65535]], np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(grey16))
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(decode(path), _grey(grey16 >> 8))  # convert("RGB") would give 0 or 255


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_and_alpha_pngs_keep_the_high_byte(tmp_path, channels):
    samples = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels)).astype(np.uint16)
    out = decode(write_png16(tmp_path / "c16.png", samples))
    expected = _grey(samples[..., 0] >> 8) if channels == 2 else (samples[..., :3] >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)  # alpha dropped; same rule as 16-bit grey


def test_16_bit_grey_and_colour_files_of_one_picture_decode_alike(tmp_path):
    grey16 = np.random.default_rng(3).integers(0, 65536, (6, 6)).astype(np.uint16)
    grey = decode(_save(tmp_path / "g.png", Image.fromarray(grey16)))
    colour = decode(write_png16(tmp_path / "c.png", np.repeat(grey16[..., None], 3, axis=2)))
    np.testing.assert_array_equal(grey, colour)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.2, 0.5, 1 / 255], [0.999, 1.0, 1e-9, 0.75]], np.float32)
    path = _save(tmp_path / "f.tif", Image.fromarray(values))
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(decode(path), _grey(np.round(values.astype(np.float64) * 255)))
    assert decode(path)[0, 1, 0] == 51  # 0.2 * 255: not black, as Pillow's convert makes it


@pytest.mark.parametrize("values, words", [
    ([[0.0, 0.5], [1.0, 7.0]], "span 0 to 7"),  # not clipped to an all-white image
    ([[-0.5, 0.0], [0.2, 1.0]], "span -0.5 to 1"),
    ([[np.nan, 0.0], [0.2, 1.0]], "NaN"),
    ([[np.inf, 0.0], [0.2, 1.0]], "infinity"),
])  # fmt: skip
def test_float_tiff_outside_unit_range_is_skipped_after_decoding(tmp_path, values, words):
    path = _save(tmp_path / "f.tif", Image.fromarray(np.array(values, np.float32)))
    assert skip_reason(path) is None  # only the pixels tell
    reason = _reason(path)
    assert words in reason and "[0, 1]" in reason


def test_int32_tiff_is_skipped_from_its_header(tmp_path):
    path = _save(tmp_path / "i32.tif", Image.fromarray(np.array([[0, 255], [256, 65535]], np.int32)))
    assert Image.open(path).mode == "I"
    assert skip_reason(path) == _reason(path)
    assert "32-bit signed integer samples" in _reason(path)  # not black (v >> 23) nor a guessed range


@pytest.mark.parametrize("mode", ["P", "L", "LA", "1", "RGBA"])
def test_8_bit_modes_decode_as_pillows_rgb(tmp_path, mode):
    img = Image.fromarray(_rgb()).convert(mode)
    path = _save(tmp_path / "m.png", img)
    np.testing.assert_array_equal(decode(path), np.asarray(Image.open(path).convert("RGB")))


def test_cmyk_decodes_as_pillows_rgb(tmp_path):
    path = _save(tmp_path / "cmyk.tif", Image.fromarray(_rgb()).convert("CMYK"))
    assert Image.open(path).mode == "CMYK"
    np.testing.assert_array_equal(decode(path), np.asarray(Image.open(path).convert("RGB")))


def test_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :8] = 255  # the left quarter white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = _save(tmp_path / "r.jpg", Image.fromarray(stored), exif=exif, quality=95)
    out = decode(path)
    assert out.shape == (32, 16, 3)  # portrait, as displayed
    assert out[:8].mean() > 240 and out[12:].mean() < 15  # the stored left side is now on top


def test_skip_reason_is_decodes_rule_without_decoding(tmp_path):
    good = _save(tmp_path / "ok.jpg", Image.fromarray(_rgb()))
    (tmp_path / "notes.jpg").write_text("this is not a JPEG\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    assert skip_reason(good) is None
    for name in ("notes.jpg", "empty.png", "bomb.png"):
        assert skip_reason(tmp_path / name) == _reason(tmp_path / name)
    found = find_images(tmp_path)
    assert found.files == ["ok.jpg"]
    assert [s.path for s in found.skipped] == ["bomb.png", "empty.png", "notes.jpg"]


# ------------------------------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty file" in _reason(tmp_path / "empty.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "cannot decode" in _reason(path)


def test_find_images_decodes_each_file_so_a_truncated_one_is_a_skip(tmp_path):
    good = _save(tmp_path / "ok.png", Image.fromarray(_rgb(64, 64)))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    assert skip_reason(tmp_path / "cut.png") is None  # the header is whole
    found = find_images(tmp_path)
    assert found.files == ["ok.png"]
    assert [(s.path, s.reason) for s in found.skipped] == [("cut.png", _reason(tmp_path / "cut.png"))]


def test_non_image_bytes_with_an_image_extension(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a JPEG\n" * 20)
    assert "not an image" in _reason(tmp_path / "notes.jpg")


def test_formats_outside_the_common_ones_are_not_opened(tmp_path):
    # An EPS would make Pillow run Ghostscript; it is refused before any decoder runs.
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert "not an image" in _reason(tmp_path / "x.eps")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (pixels never decoded)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_is_skipped_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(30000, 30000))  # 900 Mpx in 70 bytes
    assert "too large" in _reason(tmp_path / "bomb.png")


def test_pixel_limit_is_configurable(tmp_path):
    path = _save(tmp_path / "a.png", Image.fromarray(_rgb(40, 40)))
    assert "1600 pixels > 1000" in _reason(path, max_pixels=1000)
    assert decode_image(path, S, max_pixels=1600).shape == (3, S, S)


def test_broken_symlink(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    found = scan(tmp_path)
    assert found.files == []
    assert [s.path for s in found.skipped] == ["gone.jpg"] and "broken symlink" in found.skipped[0].reason


def _run_as_nobody(fn, *args):
    """fn(*args) in a forked child with uid/gid 65534 (root ignores file modes); its JSON result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(fn(*args)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        result = fh.read()
    os.waitpid(pid, 0)
    return json.loads(result)


def _scan_and_decode(folder: str) -> dict:
    found = scan(folder)
    _, reasons = decode_batch(found.root, found.files, S)
    return {"files": found.files, "reasons": reasons, "skipped": [[s.path, s.reason] for s in found.skipped]}


def test_unreadable_file_and_folder():
    # Outside pytest's 0700 tmp root, so the unprivileged child can reach the readable files.
    folder = Path(tempfile.mkdtemp(prefix="dsah-perm-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        _save(folder / "ok.png", Image.fromarray(_rgb()))
        _save(folder / "locked.png", Image.fromarray(_rgb()))
        (folder / "locked.png").chmod(0)
        (folder / "closed").mkdir()
        _save(folder / "closed" / "inner.png", Image.fromarray(_rgb()))
        (folder / "closed").chmod(0)
        (folder / "ok.png").chmod(0o644)
        result = _run_as_nobody(_scan_and_decode, str(folder)) if os.geteuid() == 0 else _scan_and_decode(str(folder))
    finally:
        (folder / "closed").chmod(0o755)
        shutil.rmtree(folder)
    assert result["files"] == ["locked.png", "ok.png"]
    assert result["reasons"] == ["permission denied", None]
    assert result["skipped"] == [["closed", "folder not readable: permission denied"]]


def test_non_utf8_file_names(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as fh:
        Image.fromarray(_rgb()).save(fh, format="PNG")
    _save(tmp_path / "b.png", Image.fromarray(_rgb()))
    found = scan(tmp_path)
    assert [os.fsencode(f) for f in found.files] == [b"b.png", b"caf\xe9-\xff.png"]
    images, reasons = decode_batch(found.root, found.files, S)
    assert reasons == [None, None] and images.shape == (2, 3, S, S)
    assert json.loads(json.dumps(found.files)) == found.files  # the manifest round-trips them


# ------------------------------------------------------------------------------------------ scan


def test_scan_is_recursive_sorted_by_bytes_and_skips_special_entries(tmp_path):
    for rel in ["b/z.png", "b/a.png", "a.png", "B.png", "b/c/d.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "link_to_b").symlink_to(tmp_path / "b")
    (tmp_path / "file_link.png").symlink_to(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe")
    found = scan(tmp_path, exclude=frozenset({"B.png"}))
    assert found.files == ["a.png", "b/a.png", "b/c/d.png", "b/z.png", "file_link.png"]
    assert [(s.path, s.reason.split(" (")[0]) for s in found.skipped] == [
        ("link_to_b", "symlink to a folder"),
        ("pipe", "not a regular file"),
    ]


def test_scan_of_one_file_and_of_an_empty_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    one = scan(tmp_path / "a.png")
    assert one.root == tmp_path and one.files == ["a.png"]
    (tmp_path / "empty").mkdir()
    empty = scan(tmp_path / "empty")
    assert empty.files == [] and empty.skipped == []
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")


def test_decode_batch_keeps_order_and_reasons(tmp_path):
    _save(tmp_path / "a.png", Image.fromarray(_rgb(seed=1)))
    (tmp_path / "b.jpg").write_bytes(b"")
    _save(tmp_path / "c.png", Image.fromarray(_rgb(seed=2)))
    images, reasons = decode_batch(tmp_path, ["a.png", "b.jpg", "c.png"], S)
    assert reasons[0] is None and "empty" in reasons[1] and reasons[2] is None
    np.testing.assert_array_equal(images[1], decode_image(tmp_path / "c.png", S))
    empty, none = decode_batch(tmp_path, ["b.jpg"], S)
    assert empty.shape == (0, 3, S, S) and none == [reasons[1]]
