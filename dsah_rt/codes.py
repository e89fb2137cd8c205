"""Binary codes: the bit convention, packing, and atomic reading/writing of codes files.

Convention (the whole project uses it): bit = 1 iff u >= 0, i.e. b = +1 for u = 0. Packed codes are
`uint8` rows of ceil(k/8) bytes, most significant bit first (`numpy.packbits` order); padding bits past
k are zero. FAISS binary indexes take these bytes as they are (they only XOR and popcount bytes), but
FAISS's `real_to_binary` packs least significant bit first: `swap_bit_order` converts between the two.

A codes file `X.npy` has a manifest `X.npy.json` beside it with `bits`, `rows`, `skipped`, `model` and
the SHA-256 of the packed array, so a manifest that does not belong to its array is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dsah_rt.atomic import atomic_write, write_json
from dsah_rt.errors import CodesError

MAX_BITS = 1024
FORMAT = "dsah-rt-codes/1"


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
    row of B bytes is taken as 8*B bits (as FAISS does). `zeros_as` (+1 or -1) reads ±1 codes that
    hold exact zeros, as `torch.sign` leaves them (DeepHash-pytorch's saved codes); without it they
    are refused, since a zero is neither bit.
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise CodesError(f"{where}: expected a 2-D array (rows x bits), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise CodesError(f"{where}: rows have no bits (shape {arr.shape})")
    one_value_per_bit = bits is not None and arr.shape[1] == bits != nbytes_for(bits)
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


def manifest_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _sha256(packed: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(packed).tobytes()).hexdigest()


def write_codes(
    path: str | os.PathLike[str],
    packed: np.ndarray,
    bits: int,
    rows: Iterable[str] | None = None,
    skipped: Iterable[dict[str, str]] = (),
    model: dict[str, Any] | None = None,
) -> Path:
    """Write `path` (packed uint8 .npy) and `path.json` (manifest), each atomically.

    The array goes first and the manifest second; the manifest's hash ties them, so a reader never
    pairs an array with a manifest from another run.
    """
    path = Path(path)
    packed, bits = to_packed(packed, bits, where=str(path))
    rows = [str(r) for r in rows] if rows is not None else [str(i) for i in range(len(packed))]
    if len(rows) != len(packed):
        raise CodesError(f"{path}: {len(rows)} row names for {len(packed)} codes")
    manifest = {
        "format": FORMAT,
        "bits": bits,
        "bit_order": "msb",
        "bit_rule": "u >= 0",
        "count": len(packed),
        "sha256": _sha256(packed),
        "model": model,
        "rows": rows,
        "skipped": list(skipped),
    }
    atomic_write(path, lambda fh: np.save(fh, packed, allow_pickle=False))
    write_json(manifest_path(path), manifest)
    return path


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CodesError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CodesError(f"{path}: not a readable .npy array ({exc})") from None


def read_codes(path: str | os.PathLike[str], bits: int | None = None, zeros_as: int | None = None) -> Codes:
    """Read codes in any accepted form; the manifest (if present) supplies bits, rows and model.

    `zeros_as` (+1 or -1): ±1 codes with exact zeros are read with the zeros as that sign (`to_packed`).
    """
    path = Path(path)
    arr = _load_npy(path)
    mpath = manifest_path(path)
    manifest: dict[str, Any] = {}
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, OSError) as exc:
            raise CodesError(f"{mpath}: unreadable manifest ({exc})") from None
        mbits = manifest.get("bits")
        if bits is not None and mbits is not None and bits != mbits:
            raise CodesError(f"{path}: --bits {bits} disagrees with the manifest's {mbits} bits")
        bits = mbits if bits is None else bits
        if manifest.get("sha256") not in (None, _sha256(arr)):
            raise CodesError(f"{mpath}: manifest does not belong to {path.name} (hash differs)")
    packed, k = to_packed(arr, bits, where=str(path), zeros_as=zeros_as)
    rows = manifest.get("rows")
    if rows is not None and len(rows) != len(packed):
        raise CodesError(f"{mpath}: {len(rows)} rows listed for {len(packed)} codes")
    return Codes(packed, k, rows, manifest.get("skipped", []), manifest.get("model"))


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
