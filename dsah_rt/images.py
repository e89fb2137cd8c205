"""The one image pipeline: what is an image, its decode to uint8 RGB and its resize to S x S.

Training (`dsah_rt.train.data`), `dsah-rt saliency`, `export --images` and `encode` all go through
`decode` and `resize` here, so a model is fed the same pixels in training and in deployment; an
exported model's codes then match the trainer's own on the same files.

Every file under a scanned folder ends up either as an image or as a `Skip` with a one-line
reason; nothing is dropped silently. The scan lists every entry (symlinks to files are followed,
symlinks to folders are not, to rule out cycles); what is an image is decided by content rather
than extension, so a PNG named .jpg decodes and a text file named .jpg is skipped as "not an
image". Images over `max_pixels` are skipped before their pixels are decoded (decompression-bomb
guard).

Decoding: EXIF orientation applied, any mode converted to RGB (alpha dropped, palettes expanded,
CMYK converted), animated images give their first frame, and samples wider than 8 bits (16-bit,
32-bit integer, float) are scaled to 8 bits, not clipped (the rule: `_to_8_bits`). Resizing: the
whole image to S x S (aspect ratio not kept, nothing cropped), Pillow's bilinear filter on uint8,
which widens its support when shrinking (antialiased) and rounds to uint8.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Decoders allowed to open files: the common photo formats. Pillow would otherwise also try
# e.g. EPS (which runs Ghostscript) or PDF on whatever bytes a folder holds.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")
MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS: ~ a 9459 x 9459 image


@dataclass(frozen=True)
class Skip:
    """A file that produced no code, and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class ImageSkip(Exception):
    """Raised by `decode_image` for a file that cannot become an image; str() is the reason."""


@dataclass
class Scan:
    """`files` relative to `root` (POSIX separators), sorted by their bytes; `skipped` sorted too."""

    root: Path
    files: list[str]
    skipped: list[Skip]


def sort_key(rel: str) -> bytes:
    """Byte order of the file-system name: deterministic, locale-free, defined for non-UTF-8 names."""
    return os.fsencode(rel)


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def scan(path: str | os.PathLike[str], exclude: frozenset[str] = frozenset()) -> Scan:
    """Every entry under `path` (recursively), or `path` itself when it is a file.

    `exclude` holds relative paths to leave out entirely (the encoder's own output files).
    """
    path = Path(path)
    if path.is_file():
        return Scan(path.parent, [path.name], [])
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such file or folder", str(path))
    files: list[str] = []
    skipped: list[Skip] = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(path / rel_dir if rel_dir else path) as it:
                entries = list(it)
        except OSError as exc:
            skipped.append(Skip(rel_dir or ".", f"folder not readable: {_os_reason(exc)}"))
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if rel in exclude:
                continue
            try:
                if entry.is_symlink():
                    if not os.path.exists(entry.path):
                        skipped.append(Skip(rel, f"broken symlink (to {os.readlink(entry.path)!r})"))
                    elif os.path.isdir(entry.path):
                        skipped.append(Skip(rel, "symlink to a folder (not followed)"))
                    else:
                        files.append(rel)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel)
                else:
                    skipped.append(Skip(rel, "not a regular file (device, socket or pipe)"))
            except OSError as exc:
                skipped.append(Skip(rel, _os_reason(exc)))
    files.sort(key=sort_key)
    skipped.sort(key=lambda s: sort_key(s.path))
    return Scan(path, files, skipped)


def find_images(
    path: str | os.PathLike[str], exclude: frozenset[str] = frozenset(), max_pixels: int = MAX_PIXELS
) -> Scan:
    """`scan`, keeping in `files` only what `skip_reason` accepts; the rest joins `skipped`.

    For loaders that list a folder now and decode each image later (training): only headers
    are read, so a file that opens but is truncated still fails when it is decoded.
    """
    found = scan(path, exclude)
    files, skipped = [], list(found.skipped)
    for rel in found.files:
        reason = skip_reason(found.root / rel, max_pixels)
        if reason is None:
            files.append(rel)
        else:
            skipped.append(Skip(rel, reason))
    skipped.sort(key=lambda s: sort_key(s.path))
    return Scan(found.root, files, skipped)


def skip_reason(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> str | None:
    """None when the file is an image by `decode`'s rule, else why it is skipped; reads the header only."""
    try:
        with _skip_on_error():
            _open(path, max_pixels).close()
    except ImageSkip as exc:
        return str(exc)
    return None


def decode(source: str | os.PathLike[str] | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (a path, or its bytes), upright; ImageSkip(reason) if none."""
    return np.array(_decode_rgb(source, max_pixels))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8, the one resize every model input goes through."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"resize takes an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    if image.shape[:2] == (size, size):
        return np.array(image)
    from PIL import Image

    return np.array(_resize_rgb(Image.fromarray(np.ascontiguousarray(image)), size))


def decode_image(path: str | os.PathLike[str], size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [3, size, size]: `resize(decode(path), size)` as the model's CHW input, or ImageSkip(reason)."""
    # Straight from Pillow image to Pillow image: the same pixels as `resize(decode(...))`
    # without two copies of the full-size image per file on encode's hot path.
    with _skip_on_error():
        rgb = _resize_rgb(_decode_rgb(path, max_pixels), size)
    return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))


def _open(source, max_pixels: int):  # noqa: ANN001, ANN202 - PIL is imported lazily
    """The opened (not yet decoded) Pillow image, after the checks that make a file an image."""
    from PIL import Image

    Image.init()  # registers every plugin, so `formats` can name AVIF, WEBP, ... (cheap after the first call)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageSkip("empty file (0 bytes)")
        source = io.BytesIO(source)
    elif os.path.getsize(source) == 0:
        raise ImageSkip("empty file (0 bytes)")
    img = Image.open(source, formats=FORMATS)
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        pixels = width * height
        raise ImageSkip(f"too large: {width}x{height} = {pixels} pixels > {max_pixels} (decompression-bomb guard)")
    return img


def _decode_rgb(source, max_pixels: int):  # noqa: ANN001, ANN202
    from PIL import ImageOps

    with _skip_on_error(), _open(source, max_pixels) as img:
        img.load()  # a truncated file opens fine and fails only here
        return _to_rgb(ImageOps.exif_transpose(img))


def _resize_rgb(rgb, size: int):  # noqa: ANN001, ANN202
    from PIL import Image

    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)


def _to_rgb(img):  # noqa: ANN001, ANN202
    """An RGB Pillow image from any mode; the integer and float modes by the rule of `_to_8_bits`."""
    if img.mode.startswith("I") or img.mode == "F":
        from PIL import Image

        return Image.fromarray(_to_8_bits(np.asarray(img), img.mode)).convert("RGB")
    return img.convert("RGB")


def _to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """uint8 from the samples of Pillow's single-channel modes wider than 8 bits.

    Pillow's own convert clips these at 255 (a 16-bit photo turns almost white, a [0, 1] float
    image black), so each is scaled from the range its data is stored in:
    * 'I;16*' (16-bit PNG, TIFF): the high byte, v >> 8, which is what Pillow itself keeps of a
      16-bit RGB(A) PNG, so a grey and a colour 16-bit file of one picture decode alike;
    * 'I' (32-bit signed): negatives are 0; an image whose values all fit in 16 bits holds
      16-bit data (older Pillow opens 16-bit PNGs as 'I') and keeps its high byte, any other is
      scaled from 0..2^31-1, v >> 23;
    * 'F' (32-bit float): the [0, 1] convention of float images, clipped to it, rounded (v * 255),
      NaN as 0.
    """
    if mode == "F":
        unit = np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0, 1.0)
        return np.round(unit * 255).astype(np.uint8)
    ints = np.maximum(values.astype(np.int64), 0)
    shift = 8 if mode != "I" or ints.size == 0 or ints.max() <= 0xFFFF else 23
    return (ints >> shift).astype(np.uint8)


@contextmanager
def _skip_on_error() -> Iterator[None]:
    """Whatever decoding raises, as ImageSkip with a one-line reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageSkip:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageSkip(f"too large: {exc} (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageSkip(f"not an image (or not one of {', '.join(FORMATS)})") from None
    except FileNotFoundError:
        raise ImageSkip("file disappeared or is a broken link") from None
    except OSError as exc:
        if exc.errno is not None:
            raise ImageSkip(_os_reason(exc)) from None
        raise ImageSkip(f"cannot decode: {exc}") from None
    except Exception as exc:  # malformed files make Pillow's decoders raise almost anything
        raise ImageSkip(f"cannot decode: {type(exc).__name__}: {exc}") from None


def decode_batch(
    root: str | os.PathLike[str], rels: list[str], size: int, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, list[str | None]]:
    """Decode `rels` (relative to `root`): (images [n_ok, 3, S, S], per file None or the skip reason)."""
    images, reasons = [], []
    for rel in rels:
        try:
            images.append(decode_image(os.path.join(root, rel), size, max_pixels))
            reasons.append(None)
        except ImageSkip as exc:
            reasons.append(str(exc))
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return stacked, reasons
