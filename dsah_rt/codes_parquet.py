"""Codes as Parquet (`codes.parquet`), for databases whose row paths would make a huge JSON manifest.

`X.parquet` is one Parquet file or a folder of part files `part-NNNNNN.parquet`, with columns

* `path` (string): the row's path relative to the input root, what `X.npy.json` lists as `rows`;
* `code` (fixed_size_binary[ceil(k/8)]): the packed code, MSB first, as a row of `X.npy`.

A Linux file name may be any bytes, a Parquet string only UTF-8: where some path is not UTF-8, it
is shown with backslash escapes in `path` and kept exactly in an extra column `path_bytes`
(binary, null for the other rows).

The manifest `X.parquet.json` has the fields of `X.npy.json` (`codes.MANIFEST_FIELDS`: bits, count,
model, every skipped file with its reason) under its own format and without `rows`, and the hash of
the packed codes in row order: `sha256` for one file (what an `X.npy` of the same codes records), or
`parts`, [{file, count, sha256}] in row order, for a folder, which its part files must match
exactly. It is required: the code length and the model are nowhere else.

Writes are atomic as `codes.write_codes` promises (`atomic.write_together`, the manifest first, so a
crash between the renames leaves a manifest whose hashes refuse the old files); part files a
previous, longer write left are removed once the new ones are in place. `codes.read_codes` and
`codes.write_codes` call this module for a `.parquet` path; it alone imports pyarrow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsah_rt.atomic import Writer, check_parent, json_writer, write_together
from dsah_rt.codes import MANIFEST_FIELDS, Codes, Schema, codes_sha256, manifest_path, nbytes_for, read_manifest, to_packed
from dsah_rt.errors import CodesError

FORMAT = "dsah-rt-codes-parquet/1"
PART_ROWS = 1 << 20
_PART = re.compile(r"part-\d{6}\.parquet")
_BATCH = 1 << 16


def _is_parts(value: Any) -> bool:
    is_hash = MANIFEST_FIELDS["sha256"][2]
    return isinstance(value, list) and all(
        isinstance(p, dict) and isinstance(p.get("file"), str) and _PART.fullmatch(p["file"]) is not None
        and isinstance(p.get("count"), int) and not isinstance(p["count"], bool) and p["count"] >= 0
        and is_hash(p.get("sha256")) for p in value
    )  # fmt: skip


# The .npy manifest's schema without `rows`; `sha256` (one file) or `parts` (a folder), as `_listing` checks.
FIELDS: Schema = {
    **{name: spec for name, spec in MANIFEST_FIELDS.items() if name != "rows"},
    "format": (True, repr(FORMAT), lambda v: v == FORMAT),
    "sha256": (False, *MANIFEST_FIELDS["sha256"][1:]),
    "parts": (False, "a list of {file: part-NNNNNN.parquet, count, sha256} objects", _is_parts),
}


def _table(packed: np.ndarray, rows: list[str]) -> pa.Table:
    code = pa.FixedSizeBinaryArray.from_buffers(pa.binary(packed.shape[1]), len(packed), [None, pa.py_buffer(packed)])
    try:
        return pa.table({"path": pa.array(rows, pa.string()), "code": code})
    except UnicodeEncodeError:  # a file name that is not UTF-8 (os.fsdecode's surrogate escapes)
        raw = [os.fsencode(r) for r in rows]
        shown = [b.decode("utf-8", "backslashreplace") for b in raw]
        exact = [b if s.encode() != b else None for b, s in zip(raw, shown)]
        return pa.table({"path": pa.array(shown, pa.string()), "code": code, "path_bytes": pa.array(exact, pa.binary())})


def _table_writer(packed: np.ndarray, rows: list[str]) -> Writer:
    """A `write` for write_together; the table is built when it runs, so one part at a time is in memory."""
    # Codes are near-random bytes that no codec shrinks; paths share long prefixes and compress well.
    compression = {"path": "zstd", "code": "none", "path_bytes": "zstd"}
    return lambda fh: pq.write_table(_table(np.ascontiguousarray(packed), rows), fh, compression=compression, use_dictionary=False)


def write_parquet(path: Path, packed: np.ndarray, rows: list[str], fields: dict[str, Any], part_rows: int | None) -> Path:
    """`codes.write_codes` for a `.parquet` path: `packed` checked and `rows` named by it; `fields`
    the manifest's shared fields. One file, or a folder of parts of `part_rows` (default PART_ROWS
    where `path` is a folder already)."""
    if part_rows is None and not path.is_dir():
        manifest = {"format": FORMAT, **fields, "sha256": codes_sha256(packed)}
        write_together([(manifest_path(path), json_writer(manifest)), (path, _table_writer(packed, rows))])
        return path
    if part_rows is not None and part_rows < 1:
        raise CodesError(f"{path}: rows per part file must be at least 1, got {part_rows}")
    if path.exists() and not path.is_dir():
        raise CodesError(f"{path}: is one file; write part files to a new folder")
    check_parent(path)
    step = part_rows or PART_ROWS
    parts = [(path / f"part-{i:06d}.parquet", slice(s, s + step)) for i, s in enumerate(range(0, max(len(packed), 1), step))]
    listed = [{"file": p.name, "count": len(packed[sl]), "sha256": codes_sha256(packed[sl])} for p, sl in parts]
    created = not path.exists()
    path.mkdir(exist_ok=True)
    try:
        write_together([
            (manifest_path(path), json_writer({"format": FORMAT, **fields, "parts": listed})),
            *((p, _table_writer(packed[sl], rows[sl])) for p, sl in parts),
        ])  # fmt: skip
    except BaseException:
        if created:
            with suppress(OSError):
                path.rmdir()
        raise
    names = {p.name for p, _ in parts}
    for stale in path.glob("part-*.parquet"):
        if stale.name not in names:
            stale.unlink()
    return path


def read_parquet(path: Path, bits: int | None) -> Codes:
    """`codes.read_codes` for a `.parquet` file or folder: every part's rows and hash checked against the manifest."""
    if not path.exists():
        raise CodesError(f"{path}: no such file or folder")
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise CodesError(f"{path}: no manifest {mpath.name} beside it (it holds the code length and the hashes)")
    manifest = read_manifest(path, bits, FIELDS)
    nbytes = nbytes_for(manifest["bits"])
    packed = np.empty((manifest["count"], nbytes), np.uint8)
    rows: list[str] = []
    start = 0
    for file, count, digest in _listing(path, manifest):
        for codes, paths in _batches(file, count, nbytes, mpath):
            packed[len(rows) : len(rows) + len(paths)] = codes
            rows += paths
        if codes_sha256(packed[start : start + count]) != digest:
            raise CodesError(f"{mpath}: manifest does not belong to {file.name} (hash differs)")
        start += count
    packed, k = to_packed(packed, manifest["bits"], where=str(path))
    return Codes(packed, k, rows, manifest.get("skipped", []), manifest.get("model"))


def _listing(path: Path, manifest: dict[str, Any]) -> list[tuple[Path, int, str]]:
    """(file, rows, sha256) of each file of `path` in row order, as the manifest lists them."""
    mpath = manifest_path(path)
    if not path.is_dir():
        if "sha256" not in manifest:
            raise CodesError(f"{mpath}: field 'sha256' is missing (one Parquet file needs the hash of its codes)")
        return [(path, manifest["count"], manifest["sha256"])]
    if "parts" not in manifest:
        raise CodesError(f"{mpath}: field 'parts' is missing (a folder of part files needs their list)")
    listing = [(path / p["file"], p["count"], p["sha256"]) for p in manifest["parts"]]
    unlisted = sorted({f.name for f in path.glob("*.parquet")} - {f.name for f, _, _ in listing})
    if unlisted:
        raise CodesError(f"{path / unlisted[0]}: a part file that {mpath.name} does not list")
    total = sum(count for _, count, _ in listing)
    if total != manifest["count"]:
        raise CodesError(f"{mpath}: field 'count' is {manifest['count']} but its parts hold {total} rows")
    return listing


def _batches(file: Path, count: int, nbytes: int, mpath: Path) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(codes, paths) of `file` in batches, after checking its columns and that it holds `count` rows."""
    if not file.is_file():
        raise CodesError(f"{file}: no such file (listed in {mpath.name})")
    try:
        reader = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        raise CodesError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    schema = reader.schema_arrow
    if "code" not in schema.names or schema.field("code").type != pa.binary(nbytes):
        found = schema.field("code").type if "code" in schema.names else "missing"
        raise CodesError(f"{file}: column 'code' must be fixed_size_binary[{nbytes}] for these codes, found {found}")
    if "path" not in schema.names or schema.field("path").type not in (pa.string(), pa.large_string()):
        raise CodesError(f"{file}: column 'path' must be strings (the rows' relative paths)")
    if reader.metadata.num_rows != count:
        raise CodesError(f"{mpath}: lists {count} rows for {file.name}, which holds {reader.metadata.num_rows}")
    columns = [c for c in ("path", "code", "path_bytes") if c in schema.names]
    try:
        for batch in reader.iter_batches(_BATCH, columns=columns):
            code, names = batch.column("code"), batch.column("path")
            if code.null_count or names.null_count:
                raise CodesError(f"{file}: null in column '{'code' if code.null_count else 'path'}'")
            yield _packed(code, nbytes), _paths(batch)
    except (OSError, pa.ArrowException) as exc:
        raise CodesError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _packed(code: pa.FixedSizeBinaryArray, nbytes: int) -> np.ndarray:
    """The array's bytes as (n, nbytes) uint8, a view of its buffer (a slice starts at `offset` rows)."""
    if not len(code):
        return np.empty((0, nbytes), np.uint8)
    data = np.frombuffer(code.buffers()[1], np.uint8, count=len(code) * nbytes, offset=code.offset * nbytes)
    return data.reshape(len(code), nbytes)


def _paths(batch: pa.RecordBatch) -> list[str]:
    paths = batch.column("path").to_pylist()
    if "path_bytes" in batch.schema.names:
        for i, raw in enumerate(batch.column("path_bytes").to_pylist()):
            if raw is not None:
                paths[i] = os.fsdecode(raw)
    return paths
