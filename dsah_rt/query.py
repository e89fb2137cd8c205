"""Search by image: encode query images with the model, rank the database codes by Hamming distance.

    results = search_images("db/codes.npy", "query.jpg", "model.onnx", k=10)

The database must be a codes file written by `dsah-rt encode` (its manifest names the rows) with
the same model: codes of two different models are not comparable, so a different fingerprint or
code length is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsah_rt.codes import read_codes
from dsah_rt.encode import display_path, encode_folder
from dsah_rt.errors import CodesError
from dsah_rt.index import BinaryIndex
from dsah_rt.runners import make_runner


def search_images(
    db_codes: str | os.PathLike[str],
    query: str | os.PathLike[str],
    model: str | os.PathLike[str],
    k: int = 10,
    backend: str = "auto",
    batch: int = 32,
    workers: int | None = None,
    threads: int | None = None,
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
        db_print = (db.model or {}).get("fingerprint")
        if db_print is not None and db_print != runner.info.fingerprint:
            raise CodesError(
                f"{db_codes} was encoded by another model (fingerprint {db_print[:12]}, {model} is "
                f"{runner.info.fingerprint[:12]}); its codes are not comparable"
            )
        encoded = encode_folder(query, None, runner, batch=batch, workers=workers)
        described = runner.describe()
    index = BinaryIndex(db.bits)
    index.add(db.packed)
    distances, indices = index.search(encoded.codes, k)
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
