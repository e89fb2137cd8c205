"""Search by codes or by image: `dsah-rt search`'s two modes, each taking its index from the factory.

    result = search_codes("q.npy", k=10, db_codes="db/codes.npy")   # or index="db.index", any kind
    results = search_images("db/codes.npy", "query.jpg", "model.onnx", k=10)

For image queries the database must be a codes file written by `dsah-rt encode` (its manifest names
the rows) with the same model: codes of two different models are not comparable, so a different
code length is refused, and so is a different fingerprint (there and between two codes files)
unless `allow_mixed_models`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsah_rt.atomic import atomic_write
from dsah_rt.codes import check_same_model, nbytes_for, read_codes
from dsah_rt.encode import display_path, encode_folder
from dsah_rt.errors import CodesError, UserError
from dsah_rt.index import build_index, load_index
from dsah_rt.runners import make_runner


@dataclass
class CodesSearch:
    """Top-k of every query code: distances (Q, k) int32, indices (Q, k) int64, `seconds` of the search
    (in a fresh process that includes loading the kernels: what a user waits for), `load_seconds`
    of reading the files and building the index."""

    distances: np.ndarray
    indices: np.ndarray
    seconds: float
    database: int
    load_seconds: float = 0.0

    def save(self, out: str | os.PathLike[str]) -> None:
        """The result file of `dsah-rt search` and `index search`: an npz of every field but `database`."""
        atomic_write(out, lambda fh: np.savez(fh, indices=self.indices, distances=self.distances,
                                              seconds=np.float64(self.seconds), load_seconds=np.float64(self.load_seconds)))  # fmt: skip


def search_codes(
    query_codes: str | os.PathLike[str],
    k: int,
    db_codes: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
    bits: int | None = None,
    zeros_as: int | None = None,
    allow_mixed_models: bool = False,
) -> CodesSearch:
    """Top-k for the codes in `query_codes`, against a codes file (exact search) or a saved index of any kind.

    `zeros_as` (+1 or -1) reads ±1 codes files that hold exact zeros (`read_codes`). Two codes files
    whose manifests name different models are refused unless `allow_mixed_models`.
    """
    if (db_codes is None) == (index is None):
        raise UserError("give exactly one of --db-codes and --index")
    loading = time.perf_counter()
    if index is not None:
        source, db = index, load_index(index, mmap=True)
        q = read_codes(query_codes, bits, zeros_as=zeros_as)
        # Bytes, not bits: a FAISS file records only bytes per code, and padding bits are zero.
        if nbytes_for(q.bits) != nbytes_for(db.bits):
            raise CodesError(f"{query_codes} has {q.bits}-bit codes but {index} holds {db.bits}-bit codes")
    else:
        source, d = db_codes, read_codes(db_codes, bits, zeros_as=zeros_as)
        q = read_codes(query_codes, d.bits if bits is None else bits, zeros_as=zeros_as)
        if q.bits != d.bits:
            raise CodesError(f"{query_codes} has {q.bits}-bit codes but {db_codes} has {d.bits}-bit codes")
        check_same_model({str(db_codes): d.fingerprint, str(query_codes): q.fingerprint}, allow_mixed_models)
        db = build_index(d.packed, "exact", d.bits)
    if not 1 <= k <= db.ntotal:
        raise CodesError(f"{source}: -k {k} must be between 1 and the database size {db.ntotal}")
    start = time.perf_counter()
    distances, indices = db.search(q.packed, k)
    return CodesSearch(distances, indices, time.perf_counter() - start, db.ntotal, start - loading)


def search_images(
    db_codes: str | os.PathLike[str],
    query: str | os.PathLike[str],
    model: str | os.PathLike[str],
    k: int = 10,
    backend: str = "auto",
    batch: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    allow_mixed_models: bool = False,
) -> dict[str, Any]:
    """Top-k database rows for every image under `query` (a file or a folder).

    Returns {"k", "bits", "model", "queries": [{"path", "neighbours": [{"rank", "path",
    "distance", "index"}]}], "skipped": [{"path", "reason"}]}; paths are printable
    (non-UTF-8 bytes escaped as \\xNN).
    """
    db = read_codes(db_codes)
    if db.rows is None:
        raise CodesError(f"{db_codes}: no manifest with row paths; encode the database with 'dsah-rt encode'")
    if not 1 <= k <= len(db):
        raise CodesError(f"{db_codes}: -k {k} must be between 1 and the database size {len(db)}")
    with make_runner(model, backend, threads=threads) as runner:
        if runner.info.bits != db.bits:
            raise CodesError(f"{model} makes {runner.info.bits}-bit codes but {db_codes} holds {db.bits}-bit codes")
        check_same_model({str(model): runner.info.fingerprint, str(db_codes): db.fingerprint}, allow_mixed_models)
        encoded = encode_folder(query, None, runner, batch=batch, workers=workers)
        described = runner.describe()
    distances, indices = build_index(db.packed, "exact", db.bits).search(encoded.codes, k)
    base = Path(query) if Path(query).is_dir() else Path(query).parent
    return {
        "k": k,
        "bits": db.bits,
        "model": described,
        "queries": [
            {
                "path": display_path(str(base / rel)),
                "neighbours": [
                    {"rank": r + 1, "path": display_path(db.rows[i]), "distance": int(d), "index": int(i)}
                    for r, (d, i) in enumerate(zip(distances[q], indices[q]))
                ],
            }
            for q, rel in enumerate(encoded.rows)
        ],
        "skipped": [{"path": display_path(s.path), "reason": s.reason} for s in encoded.skipped],
    }
