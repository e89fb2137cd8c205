"""Search backends behind one Index protocol, built and opened by one factory.

    index = build_index(codes, "exact")        # or a FAISS binary factory string: "BFlat", "BIVF1024", "BHNSW32"
    D, I = index.search(queries, k)
    index.save("db.index")
    index = load_index("db.index", mmap=True)  # the kind is read from the file

The registry, KINDS: exact (BinaryIndex, exact.py), mih (MIHIndex, mih.py: multi-index hashing, "MIH" or
"MIH<substrings>", the exact kind's results) and faiss (FaissIndex, faiss.py; faiss itself is
imported only when a FAISS index is built or opened). A new kind is one file with a class that follows
`Index` and one entry here; the factory asks each kind in turn whether it takes a spec or a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsah_rt.atomic import check_parent
from dsah_rt.codes import read_codes, to_packed
from dsah_rt.errors import SearchIndexError
from dsah_rt.index.base import Index
from dsah_rt.index.exact import BinaryIndex
from dsah_rt.index.faiss import FaissIndex
from dsah_rt.index.mih import MIHIndex

__all__ = ["KINDS", "BinaryIndex", "FaissIndex", "Index", "MIHIndex", "build_index", "index_factory", "load_index", "write_index"]

KINDS: tuple[type[Index], ...] = (MIHIndex, BinaryIndex, FaissIndex)  # MIH files are exact's container: MIH first


def index_factory(spec: str, bits: int) -> Index:
    """An empty index of the kind that accepts `spec`, for `bits`-bit codes."""
    for kind in KINDS:
        if kind.accepts(spec):
            return kind.from_spec(spec, bits)
    raise SearchIndexError(
        f"unknown index spec {spec!r}: use 'exact', 'MIH[<substrings>]' or a FAISS binary factory string (BFlat, BIVF<nlist>, BHNSW<M>)"
    )


def build_index(codes: np.ndarray, spec: str = "exact", bits: int | None = None) -> Index:
    """An index of `spec` holding `codes` (packed uint8, ±1 or 0/1; `bits` as for `to_packed`)."""
    packed, bits = to_packed(codes, bits, where="database codes")
    index = index_factory(spec, bits)
    index.add(packed)
    return index


def load_index(path: str | os.PathLike[str], mmap: bool = False) -> Index:
    """Open an index file written by any kind's `save` (or by `faiss.write_index_binary`)."""
    path = Path(path)
    if not path.is_file():
        raise SearchIndexError(f"{path}: no such index file")
    try:
        kind = next((kind for kind in KINDS if kind.recognises(path)), None)
    except OSError as exc:
        raise SearchIndexError(f"{path}: cannot read ({exc.strerror})") from None
    if kind is None:
        raise SearchIndexError(f"{path}: not an index file (neither a dsah-rt exact or MIH index nor a FAISS binary index)")
    return kind.load(path, mmap=mmap)


def write_index(
    codes_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: str = "exact",
    bits: int | None = None,
    zeros_as: int | None = None,
) -> Index:
    """`dsah-rt index build`: the codes file's codes in an index of `spec`, saved atomically to `out`."""
    check_parent(out)
    codes = read_codes(codes_path, bits, zeros_as=zeros_as)
    try:
        index = build_index(codes.packed, spec, codes.bits)
    except SearchIndexError as exc:
        raise SearchIndexError(f"{codes_path}: {exc}") from None
    index.save(out)
    return index
