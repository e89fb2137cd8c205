"""Binary codes: the bit convention, packing, and atomic reading/writing of codes files.

Convention (the whole project uses it): bit = 1 iff u >= 0, i.e. b = +1 for u = 0. Packed codes are
`uint8` rows of ceil(k/8) bytes, most significant bit first (`numpy.packbits` order); padding bits past
k are zero. FAISS binary indexes take these bytes as they are (they only XOR and popcount bytes), but
FAISS's `real_to_binary` packs least significant bit first: `swap_bit_order` converts between the two.

A codes file `X.npy` has a manifest `X.npy.json` beside it with `bits`, `count`, `rows`, `skipped`,
`model` and the SHA-256 of the packed array, so a manifest that does not belong to its array is caught.
`read_codes`, the one reader of manifests, checks each against one schema (`MANIFEST_FIELDS`).
`X.parquet` (a file or a folder of part files, `codes_parquet`) holds the rows itself, so its
manifest `X.parquet.json` has no `rows`; `read_codes` and `write_codes` choose it by the suffix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dsah_rt.atomic import json_writer, write_together
from dsah_rt.errors import CodesError

MAX_BITS = 1024
FORMAT = "dsah-rt-codes/1"
PARQUET_SUFFIX = ".parquet"
# A larger .npy is memory-mapped: the hash and the search read its pages as they reach them instead
# of a copy in memory first. Smaller ones are read whole into writable arrays, the kind the kernels
# are compiled for at start-up.
MMAP_BYTES = 64 << 20
_HASH_CHUNK = 16 << 20
# A manifest's schema, as MANIFEST_FIELDS.
Schema = dict[str, tuple[bool, str, Callable[[Any], bool]]]


def nbytes_for(bits: int) -> int:
    return (bits + 7) // 8


def binarize(u: np.ndarray) -> np.ndarray:
    """Real-valued outputs -> 0/1 bits (uint8) with the project's rule u >= 0."""
    return (np.asarray(u) >= 0).astype(np.uint8)


def pack(bits01: np.ndarray) -> np.ndarray:
    """(N, k) 0/1 -> (N, ceil(k/8)) packed uint8, MSB first, zero padding."""
    return np.packbits(np.asarray(bits01, dtype=np.uint8), axis=1)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """(N, ceil(k/8)) packed uint8 -> (N, k) 0/1 uint8."""
    return np.unpackbits(packed, axis=1, count=bits)


# Byte b read MSB-first and written LSB-first.
_REVERSED_BITS = np.packbits(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1), axis=1, bitorder="little").ravel()


def swap_bit_order(packed: np.ndarray) -> np.ndarray:
    """MSB-first packed bytes (ours, `numpy.packbits`) <-> LSB-first (`faiss.real_to_binary`); its own inverse.

    Distances do not depend on the order as long as both sides use the same one; convert only to mix
    codes packed by FAISS with ours. FAISS also sets a bit for x > 0, ours for u >= 0.
    """
    return _REVERSED_BITS[np.asarray(packed, dtype=np.uint8)]


def _check_bits(bits: int, where: str) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise CodesError(f"{where}: code length {bits} bits is outside 1..{MAX_BITS}")


def _padding_mask(bits: int) -> int:
    """Mask of the unused low bits in the last byte (0 when k is a multiple of 8)."""
    return (1 << (8 * nbytes_for(bits) - bits)) - 1


def to_packed(
    arr: np.ndarray, bits: int | None = None, where: str = "codes", zeros_as: int | None = None
) -> tuple[np.ndarray, int]:
    """Accept packed uint8, ±1 (int8/float) or 0/1 (bool/int/float) codes; return (packed, bits).

    uint8 is read as packed unless `bits` says the row is one value per bit; without `bits` a packed
    row of B bytes is taken as 8*B bits (as FAISS does), except that rows of only 0 and 1 bytes are
    refused: they read as B unpacked bits just as well, and guessing would give a wrong code length
    (and wrong distances) without a word. `zeros_as` (+1 or -1) reads ±1 codes that
    hold exact zeros, as `torch.sign` leaves them (DeepHash-pytorch's saved codes); without it they
    are refused, since a zero is neither bit.
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise CodesError(f"{where}: expected a 2-D array (rows x bits), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise CodesError(f"{where}: rows have no bits (shape {arr.shape})")
    one_value_per_bit = bits is not None and arr.shape[1] == bits != nbytes_for(bits)
    # A one-byte row cannot hold unpacked bits (one bit packed is a byte with padding set).
    if arr.dtype == np.uint8 and bits is None and arr.shape[1] > 1 and len(arr) and arr.max() == 1:
        w = arr.shape[1]
        raise CodesError(
            f"{where}: uint8 rows of only 0s and 1s may be {w} unpacked bits or {8 * w} packed ones; "
            f"give the code length (--bits {w} or --bits {8 * w}), or save the bits as bool or ±1"
        )
    if arr.dtype == np.uint8 and not one_value_per_bit:
        k = bits if bits is not None else 8 * arr.shape[1]
        _check_bits(k, where)
        if arr.shape[1] != nbytes_for(k):
            raise CodesError(
                f"{where}: packed rows have {arr.shape[1]} bytes but {k} bits need {nbytes_for(k)}"
            )
        pad = _padding_mask(k)
        if pad and len(arr) and np.any(arr[:, -1] & pad):
            raise CodesError(f"{where}: padding bits past bit {k} are set: not {k}-bit packed codes")
        return np.ascontiguousarray(arr), k
    if arr.dtype.kind not in "biuf":
        raise CodesError(f"{where}: unsupported dtype {arr.dtype} (want packed uint8, ±1 or 0/1)")
    k = arr.shape[1]
    if bits is not None and bits != k:
        raise CodesError(f"{where}: rows have {k} values but {bits} bits were expected")
    _check_bits(k, where)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise CodesError(f"{where}: codes contain NaN or infinity")
    values = np.unique(arr)
    if zeros_as is not None:
        return _signs_with_zeros(arr, values, zeros_as, where), k
    if set(values.tolist()) <= {0, 1}:
        return pack(arr), k
    if set(values.tolist()) <= {-1, 1}:
        return pack(arr > 0), k
    shown = ", ".join(str(v) for v in values[:4])
    raise CodesError(f"{where}: values must be all 0/1 or all ±1, found {shown}{'...' if len(values) > 4 else ''}")


def _signs_with_zeros(arr: np.ndarray, values: np.ndarray, zeros_as: int, where: str) -> np.ndarray:
    if zeros_as not in (1, -1):
        raise CodesError(f"{where}: zeros can be read as +1 or -1, not {zeros_as!r}")
    found = set(values.tolist())
    # Without a -1 the file reads as 0/1 codes; mapping their zeros would turn every row into ones.
    if not found <= {-1, 0, 1} or -1 not in found:
        shown = ", ".join(str(v) for v in values[:4])
        raise CodesError(f"{where}: --zeros-as reads ±1 codes with zeros (-1, 0, +1), found {shown}")
    return pack(arr >= 0 if zeros_as == 1 else arr > 0)


@dataclass
class Codes:
    """Packed codes with their manifest fields."""

    packed: np.ndarray
    bits: int
    rows: list[str] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    model: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the model that made these codes, where the manifest records one."""
        return (self.model or {}).get("fingerprint")


def check_same_model(fingerprints: dict[str, str | None], allow_mixed: bool = False) -> None:
    """Refuse to compare codes of different models: `fingerprints` maps each source (a codes file,
    a model file) to its model's fingerprint, None where unknown; `allow_mixed` lets them differ."""
    known = [(where, fp) for where, fp in fingerprints.items() if fp is not None]
    other = next(((where, fp) for where, fp in known if fp != known[0][1]), None)
    if other is not None and not allow_mixed:
        (first, fa), (second, fb) = known[0], other
        raise CodesError(
            f"{second} was encoded by another model than {first} (fingerprint {fb[:12]}, not {fa[:12]}): "
            "codes of two models are not comparable; pass --allow-mixed-models to compare them anyway"
        )


def manifest_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def codes_sha256(packed: np.ndarray) -> str:
    """SHA-256 of the array's bytes in row order, fed in chunks so a mapped array is never copied whole."""
    flat = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)
    digest = hashlib.sha256()
    for start in range(0, len(flat), _HASH_CHUNK):
        digest.update(flat[start : start + _HASH_CHUNK])
    return digest.hexdigest()


def _parquet(path: Path) -> Any:
    """The module `codes_parquet`, imported on first use: only Parquet codes load pyarrow."""
    try:
        from dsah_rt import codes_parquet
    except ImportError as exc:
        raise CodesError(f"{path}: Parquet codes need pyarrow ({exc}); pip install pyarrow") from None
    return codes_parquet


def write_codes(
    path: str | os.PathLike[str],
    packed: np.ndarray,
    bits: int,
    rows: Iterable[str] | None = None,
    skipped: Iterable[dict[str, str]] = (),
    model: dict[str, Any] | None = None,
    part_rows: int | None = None,
) -> Path:
    """Write `path` (packed uint8 .npy, or .parquet) and `path.json` (manifest), replaced as one unit.

    A `.parquet` path is one file, or a folder of part files of at most `part_rows` rows when
    `part_rows` is given or the path is a folder already (`codes_parquet.write_parquet`).

    Guarantee (`atomic.write_together`): on success both files are new and fsynced; on any error
    (full disk, read-only folder, Ctrl-C) the previous pair is left byte for byte, or nothing when
    there was none, and no temporary file. Only a crash between the two renames can mix them, and
    readers refuse every mix, because the manifest, which holds the array's SHA-256, is renamed
    first: a new manifest with the old array fails the hash check, and one without an array fails
    as a missing file. The other order could leave a new array without a manifest in a fresh
    folder, which readers would take as bare packed bytes of 8 bits per byte.
    """
    path = Path(path)
    packed, bits = to_packed(packed, bits, where=str(path))
    rows = [str(r) for r in rows] if rows is not None else [str(i) for i in range(len(packed))]
    if len(rows) != len(packed):
        raise CodesError(f"{path}: {len(rows)} row names for {len(packed)} codes")
    header = {"bits": bits, "bit_order": "msb", "bit_rule": "u >= 0", "count": len(packed)}
    if path.suffix == PARQUET_SUFFIX:
        fields = {**header, "model": model, "skipped": list(skipped)}
        return _parquet(path).write_parquet(path, packed, rows, fields, part_rows)
    if part_rows is not None:
        raise CodesError(f"{path}: part files are for .parquet codes, not {path.suffix or 'this file'}")
    manifest = {"format": FORMAT, **header, "sha256": codes_sha256(packed), "model": model, "rows": rows,
                "skipped": list(skipped)}  # fmt: skip
    write_together([
        (manifest_path(path), json_writer(manifest)),
        (path, lambda fh: np.save(fh, packed, allow_pickle=False)),
    ])  # fmt: skip
    return path


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise CodesError(f"{path}: no such file")
    try:
        if mmap and path.stat().st_size > MMAP_BYTES:
            # np.asarray: a plain read-only view of the mapping; the kernels take no memmap subclass.
            return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CodesError(f"{path}: not a readable .npy array ({exc})") from None


def read_codes(path: str | os.PathLike[str], bits: int | None = None, zeros_as: int | None = None) -> Codes:
    """Read codes in any accepted form; the manifest (if present) supplies bits, rows and model.

    `zeros_as` (+1 or -1): ±1 codes with exact zeros are read with the zeros as that sign (`to_packed`).
    """
    path = Path(path)
    if path.suffix == PARQUET_SUFFIX:
        return _parquet(path).read_parquet(path, bits)
    arr = _load_npy(path, mmap=True)
    mpath = manifest_path(path)
    if not mpath.is_file():
        packed, k = to_packed(arr, bits, where=str(path), zeros_as=zeros_as)
        return Codes(packed, k)
    manifest = read_manifest(path, bits)
    if manifest["count"] != len(arr):
        raise CodesError(f"{mpath}: field 'count' is {manifest['count']} but {path.name} holds {len(arr)} rows")
    if manifest["sha256"] != codes_sha256(arr):
        raise CodesError(f"{mpath}: manifest does not belong to {path.name} (hash differs)")
    rows = manifest.get("rows")
    if rows is not None and len(rows) != len(arr):
        raise CodesError(f"{mpath}: field 'rows' lists {len(rows)} rows for {len(arr)} codes")
    packed, k = to_packed(arr, manifest["bits"], where=str(path), zeros_as=zeros_as)
    return Codes(packed, k, rows, manifest.get("skipped", []), manifest.get("model"))


def read_manifest(path: Path, bits: int | None, fields: Schema | None = None) -> dict[str, Any]:
    """The manifest of codes file `path`, checked against `fields` (default MANIFEST_FIELDS) and `bits`."""
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, OSError) as exc:
        raise CodesError(f"{mpath}: unreadable manifest ({exc})") from None
    check_manifest(manifest, mpath, fields)
    if bits is not None and bits != manifest["bits"]:
        raise CodesError(f"{path}: --bits {bits} disagrees with the manifest's {manifest['bits']} bits")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# The manifest schema, one entry per field: (required, what it must be, test). Fields not listed
# are accepted, so a manifest from a newer writer with an extra field still reads.
MANIFEST_FIELDS: Schema = {
    "format": (True, repr(FORMAT), lambda v: v == FORMAT),
    "bits": (True, f"an integer in 1..{MAX_BITS}", lambda v: _is_int(v) and 1 <= v <= MAX_BITS),
    "count": (True, "a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "sha256": (True, "64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None),
    "bit_order": (False, "'msb'", lambda v: v == "msb"),
    "bit_rule": (False, "'u >= 0'", lambda v: v == "u >= 0"),
    "rows": (False, "null or a list of strings", lambda v: v is None or _is_strings(v)),
    "skipped": (False, "a list of {path, reason} string objects", lambda v: isinstance(v, list) and all(
        isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("reason"), str) for s in v)),
    "model": (False, "null or an object whose fingerprint is a string", lambda v: v is None or (
        isinstance(v, dict) and isinstance(v.get("fingerprint", ""), str))),
}  # fmt: skip


def check_manifest(manifest: Any, where: str | os.PathLike[str], fields: Schema | None = None) -> None:
    """Refuse a parsed manifest that breaks `fields` (default MANIFEST_FIELDS), naming `where` and the first bad field."""
    if not isinstance(manifest, dict):
        raise CodesError(f"{where}: a manifest must be a JSON object, got {_shown(manifest)}")
    for name, (required, what, test) in (fields or MANIFEST_FIELDS).items():
        if name not in manifest:
            if required:
                raise CodesError(f"{where}: field '{name}' is missing (it must be {what})")
        elif not test(manifest[name]):
            raise CodesError(f"{where}: field '{name}' must be {what}, got {_shown(manifest[name])}")


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_labels(path: str | os.PathLike[str], rows: int | None = None) -> np.ndarray:
    """Labels: int class ids (N,) or multi-hot 0/1 (N, C); `rows` must match the codes file."""
    path = Path(path)
    lab = _load_npy(path)
    if lab.ndim == 1:
        if lab.dtype.kind not in "iu":
            raise CodesError(f"{path}: class ids must be integers, got dtype {lab.dtype}")
        if len(lab) and lab.min() < 0:
            raise CodesError(f"{path}: class ids must be non-negative")
    elif lab.ndim == 2:
        if lab.dtype.kind not in "biuf" or not np.isin(lab, (0, 1)).all():
            raise CodesError(f"{path}: multi-hot labels must be 0/1 values")
        lab = lab.astype(np.uint8)
    else:
        raise CodesError(f"{path}: labels must be (N,) class ids or (N, C) multi-hot, got shape {lab.shape}")
    if rows is not None and len(lab) != rows:
        raise CodesError(f"{path}: {len(lab)} label rows but the codes have {rows} rows")
    return lab
