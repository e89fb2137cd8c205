"""One decode for every reader (issue 9, "never a silently wrong number"): each pixel mode, in a tiny
file made here, gives the same 8-bit pixels to `encode` (`decode_batch`), `saliency` (`decode`) and
training (`read_image`, the ImageFolder scan), or the same one-line reason in each; never an
all-black or all-white image read from samples the rule does not cover.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import write_png16
from PIL import Image

from dsah_rt.errors import DataError
from dsah_rt.images import ImageSkip, decode, decode_batch, find_images, skip_reason

SIDE = 4  # square, so encode's resize to SIDE x SIDE leaves the pixels alone
RAMP16 = (np.arange(SIDE * SIDE, dtype=np.uint32).reshape(SIDE, SIDE) * 4369).astype(np.uint16)  # 0..65535
UNIT = np.linspace(0, 1, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)


def write_tiff(
    path: Path, samples: np.ndarray, sample_format: int = 1, photometric: int | None = None,
    bits: int | None = None, data: bytes | None = None,
) -> Path:
    """An uncompressed little-endian TIFF of HxWxC `samples` (or of `data`, packed `bits` wide):
    the sample types Pillow reads but cannot write. `sample_format` 1 unsigned, 2 signed, 3 float."""
    h, w, c = samples.shape
    bits = bits or samples.dtype.itemsize * 8
    data = samples.astype(samples.dtype.newbyteorder("<")).tobytes() if data is None else data
    photometric = (1 if c < 3 else 2) if photometric is None else photometric
    tags = {256: [w], 257: [h], 258: [bits] * c, 259: [1], 262: [photometric], 273: [8], 277: [c], 278: [h],
            279: [len(data)], 339: [sample_format] * c}
    if c in (2, 4):
        tags[338] = [2]  # the last sample is (unassociated) alpha
    data += b"\0" * (len(data) % 2)  # the IFD that follows must start on a word boundary
    ifd_at = 8 + len(data)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    ifd, extra = struct.pack("<H", len(tags)), b""
    for tag in sorted(tags):
        kind, fmt = (4, "<I") if tag in (256, 257, 273, 278, 279) else (3, "<H")
        raw = b"".join(struct.pack(fmt, v) for v in tags[tag])
        if len(raw) > 4:  # too long for the entry: stored after the IFD, the entry holds its offset
            raw, extra = struct.pack("<I", extra_at + len(extra)), extra + raw
        ifd += struct.pack("<HHI", tag, kind, len(tags[tag])) + raw.ljust(4, b"\0")
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + data + ifd + b"\0\0\0\0" + extra)
    return path


def _pack12(samples: np.ndarray) -> bytes:
    """12-bit samples, two to three bytes, most significant bits first (TIFF FillOrder 1)."""
    a, b = samples.ravel()[0::2].astype(np.uint16), samples.ravel()[1::2].astype(np.uint16)
    return np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], axis=1).astype(np.uint8).tobytes()


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values)[..., None], 3, axis=2).astype(np.uint8)


def _pillow_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _saved(img: Image.Image, name: str) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        img.save(d / name)
        return d / name

    return write


RGB16 = np.stack([RAMP16, RAMP16[::-1], RAMP16.T], axis=2)
RAMP12 = (RAMP16 >> 4).astype(np.uint16)

# (writer, expected HxWx3 uint8); the expectation is the module's rule, worked out independently
DECODED = {
    "float32 TIFF in [0, 1]": (_saved(Image.fromarray(UNIT), "f.tif"), _grey(np.round(UNIT * 255.0))),
    "16-bit grey PNG": (_saved(Image.fromarray(RAMP16), "g.png"), _grey(RAMP16 >> 8)),
    "16-bit grey TIFF (I;16)": (_saved(Image.fromarray(RAMP16), "g.tif"), _grey(RAMP16 >> 8)),
    "16-bit big-endian TIFF (I;16B)": (
        _saved(Image.frombytes("I;16B", (SIDE, SIDE), RAMP16.astype(">u2").tobytes()), "b.tif"), _grey(RAMP16 >> 8)),
    "16-bit PGM": (lambda d: _bytes(d / "g.pgm", b"P5 4 4 65535\n" + RAMP16.astype(">u2").tobytes()), _grey(RAMP16 >> 8)),
    "16-bit RGB PNG": (lambda d: write_png16(d / "c.png", RGB16), (RGB16 >> 8).astype(np.uint8)),
    "16-bit RGBA PNG": (lambda d: write_png16(d / "a.png", np.dstack([RGB16, RAMP16])), (RGB16 >> 8).astype(np.uint8)),
    "16-bit RGB TIFF": (lambda d: write_tiff(d / "c.tif", RGB16), (RGB16 >> 8).astype(np.uint8)),
    "16-bit RGBA TIFF": (lambda d: write_tiff(d / "a.tif", np.dstack([RGB16, RAMP16])), (RGB16 >> 8).astype(np.uint8)),
    "12-bit TIFF": (lambda d: write_tiff(d / "t.tif", RAMP12[..., None], bits=12, data=_pack12(RAMP12)),
                    _grey(RAMP12 >> 4)),
    "16-bit WhiteIsZero TIFF": (lambda d: write_tiff(d / "w.tif", RAMP16[..., None], photometric=0),
                                _grey(255 - (RAMP16 >> 8))),
    "float32 WhiteIsZero TIFF": (lambda d: write_tiff(d / "wf.tif", UNIT[..., None], sample_format=3, photometric=0),
                                 _grey(255 - np.round(UNIT * 255.0))),
}

_RGB = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
# 8-bit modes: Pillow's own conversion to RGB is the rule
PILLOW_MODES = {
    "1-bit": _saved(Image.fromarray(_RGB).convert("1"), "m.png"),
    "palette": _saved(Image.fromarray(_RGB).convert("P"), "p.png"),
    "LA": _saved(Image.fromarray(_RGB).convert("LA"), "la.png"),
    "CMYK TIFF": _saved(Image.fromarray(_RGB).convert("CMYK"), "k.tif"),
}

# (writer, the reason's words, whether the header alone tells)
REFUSED = {
    "float32 TIFF in 0..255": (_saved(Image.fromarray(UNIT * 255), "f.tif"), "float samples span 0 to 255", False),
    "float32 TIFF with negatives": (_saved(Image.fromarray(UNIT - 0.5), "f.tif"), "span -0.5 to 0.5", False),
    "float32 TIFF with NaN": (_saved(Image.fromarray(np.where(UNIT > 0.5, np.nan, UNIT)), "f.tif"), "NaN", False),
    "int32 TIFF (Pillow's 'I')": (_saved(Image.fromarray(RAMP16.astype(np.int32)), "i.tif"),
                                  "32-bit signed integer samples", True),
    "uint32 TIFF": (lambda d: write_tiff(d / "u.tif", RAMP16.astype(np.uint32)[..., None]),
                    "32-bit integer samples", True),
    "int16 TIFF": (lambda d: write_tiff(d / "s.tif", RAMP16.astype(np.int16)[..., None], 2),
                   "16-bit signed integer samples", True),
    "int8 TIFF": (lambda d: write_tiff(d / "s8.tif", np.full((SIDE, SIDE, 1), -1, np.int8), 2),
                  "8-bit signed integer samples", True),
}


def _every_reader(path: Path) -> list[np.ndarray | str]:
    """What encode, saliency, the training split and the ImageFolder scan each make of `path`:
    HxWx3 pixels, or the reason it is refused."""
    from dsah_rt.train.data import read_image

    out: list[np.ndarray | str] = []
    images, reasons = decode_batch(path.parent, [path.name], SIDE)
    out.append(reasons[0] if reasons[0] else images[0].transpose(1, 2, 0))
    try:
        out.append(decode(path))
    except ImageSkip as exc:
        out.append(str(exc))
    try:
        out.append(read_image(path))
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path}: cannot read image (")
        out.append(message.split(" (", 1)[1][:-1])
    found = find_images(path.parent)
    out.append(decode(path) if found.files == [path.name] else found.skipped[0].reason)
    return out


@pytest.mark.parametrize("case", [*DECODED, *PILLOW_MODES])
def test_each_mode_gives_every_reader_the_same_pixels(tmp_path, case):
    if case in DECODED:
        write, expected = DECODED[case]
        path = write(tmp_path)
    else:
        path = PILLOW_MODES[case](tmp_path)
        expected = _pillow_rgb(path)
    for got in _every_reader(path):
        assert not isinstance(got, str), got
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", REFUSED)
def test_samples_without_an_8_bit_reading_are_refused_by_every_reader(tmp_path, case):
    write, words, header_alone = REFUSED[case]
    path = write(tmp_path)
    reasons = _every_reader(path)
    assert all(isinstance(r, str) and "\n" not in r for r in reasons), reasons
    assert len(set(reasons)) == 1 and words in reasons[0], reasons
    # encode's scan already skips what the header tells, before any pixel is decoded
    assert skip_reason(path) == (reasons[0] if header_alone else None)
