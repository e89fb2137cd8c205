"""The `dsah-rt` command line: parse, call the library, print. User errors are one line.

Commands of the PyTorch and export stages live beside their code and are imported only when used,
so `dsah-rt --help` stays fast; command modules import heavy packages inside the command body.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from dsah_rt.atomic import check_outputs, write_json
from dsah_rt.cli_db import echo_ranked, index_load, index_search
from dsah_rt.cli_options import AtLeast, backend_option, mixed_models_option, zeros_option
from dsah_rt import numba_cache
from dsah_rt.errors import UserError, os_error_message

# name -> "module:attribute" of a click command defined with its stage.
LAZY_COMMANDS: dict[str, str] = {
    "train": "dsah_rt.train.cli:train",
    "saliency": "dsah_rt.train.cli:saliency",
    "export": "dsah_rt.export.cli:export",
    "verify": "dsah_rt.export.cli:verify",
    "encode": "dsah_rt.cli_encode:encode",
    "bench": "dsah_rt.bench.cli:bench",
    "demo": "dsah_rt.bench.cli:demo",
}


class Group(click.Group):
    """Lazily imported commands; UserError, and an OS error naming its file, turned into one line
    without a traceback; SIGTERM handled as Ctrl-C."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                return _unavailable(name, exc)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        with _sigterm_as_interrupt():
            try:
                return super().invoke(ctx)
            except UserError as exc:
                raise click.ClickException(str(exc)) from None
            except OSError as exc:
                # A file that cannot be read or written (permissions, a full disk) is the user's to
                # fix; an OS error without a file is not understood here, so it keeps its traceback.
                if exc.filename is None:
                    raise
                raise click.ClickException(os_error_message(exc)) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (a scheduler's or `kill`'s default) unwind like Ctrl-C, so the cleanup that every
    command does on KeyboardInterrupt runs too: temporary files removed, a partial state saved."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unavailable(name: str, exc: ImportError) -> click.Command:
    @click.command(name, help=f"(unavailable: {exc.name} is not installed)")
    def stub() -> None:
        raise UserError(f"'dsah-rt {name}' needs the missing package {exc.name} (pip install 'dsah-rt[train]')")

    return stub


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsah-rt")
def main() -> None:
    """Deep Saliency Hashing: train, export one fused model, encode images, rank and evaluate codes."""
    numba_cache.OWN_PROCESS = True


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@main.command("eval")
@click.option("--query-codes", "-q", required=True, type=click.Path(), help="Query codes .npy or .parquet.")
@click.option("--db-codes", "-d", required=True, type=click.Path(), help="Database codes .npy or .parquet.")
@click.option("--query-labels", required=True, type=click.Path(dir_okay=False), help="(N,) class ids or (N, C) multi-hot .npy.")
@click.option("--db-labels", required=True, type=click.Path(dir_okay=False), help="Labels of the database rows .npy.")
@click.option("--bits", type=int, default=None, help="Code length, for packed codes without a manifest.")
@click.option("--topk", type=int, default=0, show_default=True, help="MAP@topk; 0 means the whole ranking.")
@click.option("--radius", type=int, default=2, show_default=True, help="Hamming radius for precision/recall.")
@click.option("--threads", type=AtLeast(1), default=None, help="Kernel threads (default: all cores).")
@zeros_option()
@mixed_models_option()
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write all metrics as JSON (with a format key).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the precision-recall curve as PNG.")
def eval_command(query_codes, db_codes, query_labels, db_labels, bits, topk, radius, threads, zeros_as, allow_mixed_models, json_out, plot) -> None:
    """MAP (index-order and tie-aware with bounds), precision/recall within a radius, P@k and PR curves."""
    from dsah_rt.metrics import evaluate_files
    from dsah_rt.native import set_threads

    check_outputs([json_out, plot], [query_codes, db_codes, query_labels, db_labels])
    set_threads(threads)
    res = evaluate_files(query_codes, db_codes, query_labels, db_labels, bits, topk, radius, zeros_as, allow_mixed_models)
    at = f"@{topk}" if topk else "@all"
    _print_table([
        (f"MAP{at} (ties by index)", f"{res.map:.6f}"),
        ("MAP tie-aware [best, worst]", f"{res.map_tie_aware:.6f} [{res.map_tie_best:.6f}, {res.map_tie_worst:.6f}]"),
        (f"precision / recall r<={radius}", f"{res.precision_at_radius:.6f} / {res.recall_at_radius:.6f}"),
        ("queries x database, bits", f"{res.queries} x {res.database}, {res.bits}"),
        ("queries without relevant", str(res.queries_without_relevant)),
        ("seconds", f"{res.seconds:.4f}"),
    ])
    if json_out:
        write_json(json_out, res.to_dict())
    if plot:
        from dsah_rt.plots import plot_pr

        plot_pr({"codes": res.to_dict()}, plot)


@main.command("search")
@click.option("--db-codes", "-d", type=click.Path(), help="Database codes .npy or .parquet (or use --index).")
@click.option("--index", "index_path", type=click.Path(dir_okay=False), help="A saved index of any kind ('dsah-rt index build'), with --query-codes.")
@click.option("--query-codes", "-q", type=click.Path(), help="Query codes .npy or .parquet (or use --query).")
@click.option("--query", "query_images", type=click.Path(exists=True), help="Query image or folder, encoded with --model.")
@click.option("--model", "model_path", type=click.Path(exists=True), help="model.onnx / model.engine that made the database.")
@backend_option()
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--bits", type=int, default=None, help="Code length, for packed codes without a manifest.")
@click.option("--threads", type=AtLeast(1), default=None, help="Kernel threads (default: all cores).")
@zeros_option()
@mixed_models_option()
@click.option("--out", type=click.Path(dir_okay=False), help="Result .npz: indices, distances, seconds (with --query-codes).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Ranked paths and distances as JSON (with --query).")
def search_command(db_codes, index_path, query_codes, query_images, model_path, backend, k, bits, threads, zeros_as, allow_mixed_models, out, json_out) -> None:
    """Top-k Hamming search; exact ones (--db-codes, exact index files) order ties by database index.

    Either --query-codes Q.npy against --db-codes D.npy or --index INDEX (writes --out R.npz), or
    --query IMAGE_OR_DIR --model M against --db-codes, which encodes the images and prints each one's
    ranked database paths (from the manifest) with their distances.
    """
    if (query_codes is None) == (query_images is None):
        raise UserError("give exactly one of --query-codes and --query")
    if threads is not None:
        from dsah_rt.native import set_threads

        set_threads(threads)
    if query_images is not None:
        from dsah_rt.query import search_images

        if model_path is None:
            raise UserError("--query needs --model (the model that encoded the database)")
        if db_codes is None or index_path is not None:
            raise UserError("--query needs --db-codes, not --index (an index file has no row paths)")
        check_outputs([json_out], [db_codes, query_images, model_path])
        result = search_images(db_codes, query_images, model_path, k=k, backend=backend, allow_mixed_models=allow_mixed_models)
        echo_ranked(result, json_out)
        return
    if out is None:
        raise UserError("--query-codes needs --out R.npz")
    check_outputs([out], [db_codes, index_path, query_codes])
    from dsah_rt.query import search_codes

    r = search_codes(query_codes, k, db_codes=db_codes, index=index_path, bits=bits, zeros_as=zeros_as,
                     allow_mixed_models=allow_mixed_models)
    r.save(out)
    click.echo(f"{len(r.indices)} queries x {r.database} codes, k={k}: {r.seconds:.4f} s "
               f"(reading the files {r.load_seconds:.4f} s) -> {out}")


@main.group("index")
def index_group() -> None:
    """Build search index files (exact, MIH or FAISS) for 'dsah-rt search --index', or load and
    search a served index in PostgreSQL + pgvector (load, search)."""


@index_group.command("build")
@click.argument("codes", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Index file to write.")
@click.option("--faiss", "spec", default=None, help="FAISS binary factory string (BFlat, BIVF<nlist>, BHNSW<M>); default: the exact index.")
@click.option("--mih", is_flag=True, help="Multi-index hashing: the exact index's results, sub-linear search on large databases.")
@click.option("--substrings", type=int, default=None, help="With --mih: substrings per code (default: from the database size).")
@click.option("--bits", type=int, default=None, help="Code length, for packed codes without a manifest.")
@zeros_option()
def index_build(codes, out, spec, mih, substrings, bits, zeros_as) -> None:
    """Write CODES as an index file: the exact index (memory-mapped by search), an MIH one (the same
    results, tables memory-mapped too) or a FAISS one that faiss.read_index_binary opens."""
    from dsah_rt.index import write_index

    if mih and spec:
        raise UserError("give at most one of --faiss and --mih")
    if substrings is not None and not mih:
        raise UserError("--substrings needs --mih")
    if mih:
        spec = "MIH" if substrings is None else f"MIH{substrings}"
    check_outputs([out], [codes])
    index = write_index(codes, out, spec or "exact", bits, zeros_as)
    click.echo(f"{index.ntotal} {index.bits}-bit codes -> {index.kind} index {out}")


index_group.add_command(index_load)
index_group.add_command(index_search)


@main.group("codes")
def codes_group() -> None:
    """Codes files in other projects' layouts."""


@codes_group.command("export")
# One layout so far; naming it keeps a script's command line valid when another comes.
@click.option("--layout", required=True, type=click.Choice(["deephash"]), help="deephash: DeepHash-pytorch's tst_/trn_ files.")
@click.option("--query-codes", "-q", type=click.Path(dir_okay=False), help="Query codes -> tst_binary.npy (±1 float32).")
@click.option("--db-codes", "-d", type=click.Path(dir_okay=False), help="Database codes -> trn_binary.npy (±1 float32).")
@click.option("--query-labels", type=click.Path(dir_okay=False), help="Query labels -> tst_label.npy (one-hot int8).")
@click.option("--db-labels", type=click.Path(dir_okay=False), help="Database labels -> trn_label.npy (one-hot int8).")
@click.option("--bits", type=int, default=None, help="Code length, for packed codes without a manifest.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into (created if missing).")
def codes_export(layout, query_codes, db_codes, query_labels, db_labels, bits, out) -> None:
    """Write codes and labels as DeepHash-pytorch saves them, for its CalcTopMap and pr_curve.

    Class ids become one-hot rows over one class count for query and database; multi-hot labels stay
    multi-hot (int64, as its list files give them).
    """
    from dsah_rt.deephash import export_deephash

    for path in export_deephash(out, query_codes, db_codes, query_labels, db_labels, bits).values():
        click.echo(f"wrote {path} ({layout} layout)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
