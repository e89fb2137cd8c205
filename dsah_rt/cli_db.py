"""`dsah-rt index load` and `dsah-rt index search`: the served index in PostgreSQL + pgvector.

Only click at import time: `dsah-rt --help` lists these commands without loading numpy or psycopg.
"""

from __future__ import annotations

from typing import Any

import click

from dsah_rt.atomic import check_outputs, write_json
from dsah_rt.cli_options import backend_option, zeros_option
from dsah_rt.errors import UserError

DB_HELP = "embedded:DIR (the bundled PostgreSQL + pgvector with its data in DIR, started or reused) or a libpq DSN / URI."
TABLE_HELP = "Table of the codes (lower-case letters, digits, underscores)."


def echo_ranked(result: dict[str, Any], json_out: str | None) -> None:
    """Print a search-by-image result (each query, then its ranked neighbours) and write it as JSON."""
    for query in result["queries"]:
        click.echo(query["path"])
        for hit in query["neighbours"]:
            click.echo(f"  {hit['rank']:>3}  {hit['distance']:>4}  {hit['path'] if hit['path'] is not None else hit['index']}")
    for skip in result["skipped"]:
        click.echo(f"skipped query {skip['path']}: {skip['reason']}", err=True)
    if json_out:
        write_json(json_out, result)


@click.command("load")
@click.argument("codes", type=click.Path())
@click.option("--db", "dsn", required=True, help=DB_HELP)
@click.option("--table", required=True, help=TABLE_HELP)
@click.option("--bits", type=int, default=None, help="Code length, for packed codes without a manifest.")
@click.option("--hnsw", is_flag=True, help="Add an HNSW index (pgvector bit_hamming_ops) for 'index search --ef-search'.")
@click.option("--m", type=int, default=None, help="With --hnsw: graph links per node.  [default: 16]")
@click.option("--ef-construction", type=int, default=None, help="With --hnsw: candidates kept while building.  [default: 64]")
@zeros_option()
def index_load(codes, dsn, table, bits, hnsw, m, ef_construction, zeros_as) -> None:
    """Load CODES into a PostgreSQL table (id = row position, path, code bit(k)), in one transaction.

    Rerunning adds only rows the table lacks; codes of another length or model are refused.
    """
    from dsah_rt.pgindex import load, redact

    if not hnsw and (m is not None or ef_construction is not None):
        raise UserError("--m and --ef-construction need --hnsw")
    r = load(codes, dsn, table, bits, hnsw, 16 if m is None else m, 64 if ef_construction is None else ef_construction, zeros_as)
    click.echo(f"{r.added} new {r.bits}-bit codes -> table {r.table} ({r.rows} rows) in {redact(dsn)}: {r.seconds:.2f} s")


@click.command("search")
@click.option("--db", "dsn", required=True, help=DB_HELP)
@click.option("--table", required=True, help=TABLE_HELP)
@click.option("--query-codes", "-q", type=click.Path(), help="Query codes .npy or .parquet (or use --query).")
@click.option("--query", "query_images", type=click.Path(exists=True), help="Query image or folder, encoded with --model.")
@click.option("--model", "model_path", type=click.Path(exists=True), help="model.onnx / model.engine that made the table's codes.")
@backend_option()
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--exact", is_flag=True, help="Exact search, ties by id, as 'dsah-rt search' (the default).")
@click.option("--ef-search", type=int, default=None, help="Approximate search on the HNSW index with this candidate list size (>= k).")
@click.option("--bits", type=int, default=None, help="Code length, for packed query codes without a manifest.")
@zeros_option()
@click.option("--out", type=click.Path(dir_okay=False), help="Result .npz: indices, distances, seconds (with --query-codes).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Ranked paths and distances as JSON (with --query).")
def index_search(dsn, table, query_codes, query_images, model_path, backend, k, exact, ef_search, bits, zeros_as, out, json_out) -> None:
    """Top-k Hamming search in a table made by 'index load'; the npz of 'dsah-rt search'.

    --exact orders by (distance, id) and equals 'dsah-rt search --db-codes'; --ef-search N asks the
    HNSW index (approximate; an unfilled slot has index -1).
    """
    if exact and ef_search is not None:
        raise UserError("give at most one of --exact and --ef-search")
    if (query_codes is None) == (query_images is None):
        raise UserError("give exactly one of --query-codes and --query")
    if query_images is not None:
        from dsah_rt.pgindex import search_images

        if model_path is None:
            raise UserError("--query needs --model (the model that encoded the table's codes)")
        check_outputs([json_out], [query_images, model_path])
        echo_ranked(search_images(dsn, table, query_images, model_path, k=k, ef_search=ef_search, backend=backend), json_out)
        return
    if out is None:
        raise UserError("--query-codes needs --out R.npz")
    check_outputs([out], [query_codes])
    from dsah_rt.pgindex import search

    r = search(dsn, table, query_codes, k, ef_search=ef_search, bits=bits, zeros_as=zeros_as)
    r.save(out)
    how = "exact" if ef_search is None else f"HNSW ef_search={ef_search}"
    click.echo(f"{len(r.indices)} queries x {r.database} codes, k={k}, {how}: {r.seconds:.4f} s -> {out}")
