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

Decoding: EXIF orientation applied, animated images give their first frame, and every mode becomes
8-bit RGB by one rule, or the file is skipped with the reason (never a silently black or white one):
* 8-bit modes ('1', 'L', 'P', 'LA', 'RGB', 'RGBA', 'CMYK', ...): Pillow's conversion to RGB (alpha
  dropped, palettes expanded, CMYK converted without a colour profile);
* 16-bit unsigned samples ('I;16*', and 'I' from a PNG or PGM): the high byte, v >> 8, which is what
  Pillow keeps of 16-bit RGB(A) PNGs and TIFFs, so a grey and a colour file of one picture decode
  alike; a TIFF's 12-bit samples are scaled from 12 bits;
* float samples ('F', 32-bit float TIFF): values in [0, 1] times 255, rounded; a file holding any
  value outside [0, 1], NaN or infinity is skipped: its range (0..255? 0..65535? HDR?) is a guess;
* signed or 32-bit integer samples (TIFF): skipped, from the header alone: no range is implied
  (a label map or a depth image in 0..4095 would come out black scaled from 32 bits);
* a WhiteIsZero TIFF is inverted at every sample width (Pillow itself does so for 1 and 8 bits).
Resizing: the whole image to S x S (aspect ratio not kept, nothing cropped), Pillow's bilinear
filter on uint8, which widens its support when shrinking (antialiased) and rounds to uint8.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsah_rt.errors import DataError

# Decoders allowed to open files: the common photo formats. Pillow would otherwise also try
# e.g. EPS (which runs Ghostscript) or PDF on whatever bytes a folder holds.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")
MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS: ~ a 9459 x 9459 image
_BITS_PER_SAMPLE, _PHOTOMETRIC, _SAMPLE_FORMAT = 258, 262, 339  # TIFF tags
_WHITE_IS_ZERO, _SIGNED_INTEGER = 0, 2  # values of _PHOTOMETRIC and _SAMPLE_FORMAT


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

    `exclude` holds relative paths to leave out entirely (the encoder's own output files). A `path`
    that is neither (a device, socket or pipe) is a DataError; inside a folder such entries are skips.
    """
    path = Path(path)
    if path.is_file():
        return Scan(path.parent, [path.name], [])
    if path.exists() and not path.is_dir():
        # Reading a FIFO would block until a writer comes, and /dev/null or /dev/zero is no image.
        raise DataError(f"{path}: not a file or folder of images (a device, socket or pipe)")
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
    """`scan`, keeping in `files` only what `decode` accepts (`decode_reasons`); the rest joins `skipped`.

    For loaders that list a folder now and decode each image later, every epoch (training): each
    file is decoded once here, so a truncated file or a refused sample type is a skip now rather
    than an error after an epoch.
    """
    found = scan(path, exclude)
    files, skipped = [], list(found.skipped)
    reasons = decode_reasons([found.root / rel for rel in found.files], max_pixels)
    for rel, reason in zip(found.files, reasons):
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


def decode_reasons(paths: Sequence[str | os.PathLike[str]], max_pixels: int = MAX_PIXELS) -> list[str | None]:
    """Per path, None when `decode` succeeds on it, else why it is skipped; the pixels are discarded.

    Unlike `skip_reason` the whole file is decoded, so this costs one decode of every file; threads
    share it, as Pillow's decoders release the GIL."""

    def reason(path: str | os.PathLike[str]) -> str | None:
        try:
            _decode_rgb(path, max_pixels)
        except ImageSkip as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="dsah-check") as pool:
        return list(pool.map(reason, paths))


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
    try:
        _check_header(img, max_pixels)
    except ImageSkip:
        img.close()
        raise
    return img


def _check_header(img, max_pixels: int) -> None:  # noqa: ANN001
    """ImageSkip for what the header alone rules out: too many pixels, samples without an 8-bit reading."""
    width, height = img.size
    if width * height > max_pixels:
        pixels = width * height
        raise ImageSkip(f"too large: {width}x{height} = {pixels} pixels > {max_pixels} (decompression-bomb guard)")
    if img.format != "TIFF":
        return  # Pillow gives 'I' for a PNG's or PGM's 16-bit samples too: those are unsigned
    # Pillow reads 8-bit signed samples as unsigned (-1 as 255) and widens 16-bit ones to 'I'.
    signed = _tiff_tag(img, _SAMPLE_FORMAT) == _SIGNED_INTEGER
    if signed or img.mode == "I":
        kind = f"{_tiff_tag(img, _BITS_PER_SAMPLE)}-bit {'signed ' if signed else ''}integer samples"
        raise ImageSkip(f"{kind}: no range to scale to 8 bits (save as unsigned 8- or 16-bit, or float in [0, 1])")


def _tiff_tag(img, tag: int) -> int:  # noqa: ANN001
    """A TIFF tag's first value (one per sample for the per-sample tags), or its default, 1."""
    value = img.tag_v2.get(tag, 1)
    return value[0] if isinstance(value, tuple) else value


def _decode_rgb(source, max_pixels: int):  # noqa: ANN001, ANN202
    from PIL import ImageOps

    with _skip_on_error(), _open(source, max_pixels) as img:
        img.load()  # a truncated file opens fine and fails only here
        # Read before exif_transpose, whose copy of the image has lost the TIFF header.
        bits = _tiff_tag(img, _BITS_PER_SAMPLE) if img.format == "TIFF" else 16
        inverted = img.format == "TIFF" and _tiff_tag(img, _PHOTOMETRIC) == _WHITE_IS_ZERO
        return _to_rgb(ImageOps.exif_transpose(img), bits, inverted)


def _resize_rgb(rgb, size: int):  # noqa: ANN001, ANN202
    from PIL import Image

    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)


def _to_rgb(img, bits: int, inverted: bool):  # noqa: ANN001, ANN202
    """An RGB Pillow image from any mode; the integer and float modes by the rule of `_to_8_bits`."""
    if img.mode.startswith("I") or img.mode == "F":
        from PIL import Image

        return Image.fromarray(_to_8_bits(np.asarray(img), img.mode, bits, inverted)).convert("RGB")
    return img.convert("RGB")


def _to_8_bits(values: np.ndarray, mode: str, bits: int, inverted: bool) -> np.ndarray:
    """uint8 from the samples of Pillow's single-channel modes wider than 8 bits, by the module's rule.

    Pillow's own convert clips these at 255 (a 16-bit photo turns almost white, a [0, 1] float
    image black). `bits` is the stored sample width (a 12-bit TIFF's samples are held unscaled in
    'I;16'), `inverted` a WhiteIsZero TIFF's, which Pillow inverts for 1- and 8-bit samples only.
    """
    if mode == "F":
        if not np.isfinite(values).all():
            raise ImageSkip("float samples include NaN or infinity; a float image must hold values in [0, 1]")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise ImageSkip(f"float samples span {low:g} to {high:g}; a float image must hold values in [0, 1]")
        scaled = np.round(values.astype(np.float64) * 255).astype(np.uint8)
    else:
        scaled = (values.astype(np.uint32) >> (bits - 8)).astype(np.uint8)
    return 255 - scaled if inverted else scaled


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
    root: str | os.PathLike[str], rels: list[str], size: int, max_pixels: int = MAX_PIXELS,
    read: Callable[[str], bytes] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Decode `rels` (relative to `root`): (images [n_ok, 3, S, S], per file None or the skip reason).

    `read` (entry -> bytes, raising ImageSkip) replaces opening `root/rel`, e.g. for URIs.
    """
    images, reasons = [], []
    for rel in rels:
        try:
            source = read(rel) if read is not None else os.path.join(root, rel)
            images.append(decode_image(source, size, max_pixels))  # type: ignore[arg-type] - decodes bytes too
            reasons.append(None)
        except ImageSkip as exc:
            reasons.append(str(exc))
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return stacked, reasons
