"""Folder scan, image decode and resize, and the reason a file is skipped.

Every file under the scanned folder ends up either as a decoded image or as a `Skip` with a
one-line reason; nothing is dropped silently. The scan lists every entry (symlinks to files are
followed, symlinks to folders are not, to rule out cycles); the decoder then decides what is an
image, by content rather than extension, so a PNG named .jpg decodes and a text file named
.jpg is skipped as "not an image".

Decoding matches the training loader (`dsah_rt.train.data.core.read_image` then a bilinear,
antialiased resize of the whole image to S x S): EXIF orientation applied, any mode converted to
RGB (alpha dropped, palettes expanded, CMYK converted), animated images give their first frame.
16-bit greyscale is scaled to 8 bits (Pillow's own conversion clips it at 255). Images over
`max_pixels` are skipped before their pixels are decoded (decompression-bomb guard).
"""

from __future__ import annotations

import errno
import os
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


def _to_rgb(img):  # noqa: ANN001, ANN202 - PIL images; PIL is imported lazily
    """An RGB Pillow image from any mode."""
    if img.mode.startswith("I;16") or img.mode == "I":
        from PIL import Image

        # 16-bit (or 32-bit int holding 16-bit) greyscale: keep the top 8 bits, as a viewer would.
        grey = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def decode_image(path: str | os.PathLike[str], size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [3, size, size] RGB of the image file at `path`, or ImageSkip(reason)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.init()  # registers every plugin, so `formats` can name AVIF, WEBP, ... (cheap after the first call)
    try:
        if os.path.getsize(path) == 0:
            raise ImageSkip("empty file (0 bytes)")
        with Image.open(path, formats=FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                pixels = width * height
                raise ImageSkip(f"too large: {width}x{height} = {pixels} pixels > {max_pixels} (decompression-bomb guard)")
            img.load()  # a truncated file opens fine and fails only here
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1))
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
