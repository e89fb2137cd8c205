"""The bench report as a terminal table, markdown and PNG plots (the JSON is the report itself).

Each table is built once as (header, rows) and rendered twice: aligned text for the terminal,
pipes for markdown, so the two never disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsah_rt.atomic import atomic_write

Table = tuple[list[str], list[list[str]]]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _agreement(result: dict[str, Any]) -> str:
    agree = result.get("bit_agreement")
    if agree is None:
        return "n/a (no reference)"
    return f"{agree['agreement']:.5f} ({agree['flipped']}/{agree['bits_compared']} flipped)"


def backend_table(report: dict[str, Any]) -> Table:
    """One row per backend: throughput at every batch size, latency at the smallest, agreement, size, memory."""
    batches = report["settings"]["batch_sizes"]
    first = batches[0]
    header = ["backend", "status", *[f"img/s @{b}" for b in batches], f"median ms @{first}",
              f"p99 ms @{first}", "bit agreement", "size MB", "peak RSS MB"]  # fmt: skip
    rows = []
    for r in report["encoding"]:
        if r["status"] != "ok":
            rows.append([r["backend"], r["status"], *["-"] * (len(header) - 2)])
            continue
        by_batch = {row["batch"]: row for row in r["rows"]}
        lat = by_batch[first]["latency_ms"]
        rows.append([r["backend"], "ok", *[_num(by_batch[b]["images_per_s"], 0) for b in batches],
                     _num(lat["median"], 3), _num(lat["p99"], 3), _agreement(r),
                     _num(r["model_bytes"] / 2**20, 2), _num(r["peak_rss_mb"], 0)])  # fmt: skip
    return header, rows


def latency_table(report: dict[str, Any]) -> Table:
    header = ["backend", "batch", "img/s", "min", "mean", "median", "p90", "p95", "p99", "max", "iterations",
              "H2D / compute / D2H median ms"]  # fmt: skip
    rows = []
    for r in report["encoding"]:
        for row in r.get("rows", []):
            lat = row["latency_ms"]
            phases = _phases(row, r["spec"]["device"])
            rows.append([r["backend"], str(row["batch"]), _num(row["images_per_s"], 0),
                         *[_num(lat[k], 3) for k in ("min", "mean", "median", "p90", "p95", "p99", "max")],
                         str(lat["n"]), phases])  # fmt: skip
    return header, rows


def _phases(row: dict[str, Any], device: str) -> str:
    if "h2d_ms" in row:
        return " / ".join(_num(row[f"{p}_ms"]["median"], 3) for p in ("h2d", "compute", "d2h"))
    return "n/a (CPU)" if device == "cpu" else "not separable (one runner call)"


def retrieval_tables(report: dict[str, Any]) -> list[Table]:
    ret = report.get("retrieval")
    if not ret:
        return []
    map_rows = [[f"{m['queries']:,} x {m['database']:,}", str(m["bits"]), _num(m["ours_seconds"], 3),
                 _num(m["ours_tie_aware_seconds"], 3), _num(m["numpy_seconds_extrapolated"], 2),
                 f"{m['speedup_index_order']:.0f}x", f"{m['speedup_tie_aware']:.0f}x",
                 f"{m['max_abs_diff_vs_numpy_stable']:.1e}"] for m in ret["map"]]  # fmt: skip
    topk_rows = [[f"{t['queries']:,} x {t['database']:,}", str(t["bits"]), str(t["k"]), _num(t["ours_seconds"], 3),
                  _num(t.get("faiss_seconds"), 3),
                  f"{t['speedup_vs_faiss']:.2f}x" if "speedup_vs_faiss" in t else "n/a (no faiss)",
                  str(t.get("distances_identical", "-")), str(t["indices_consistent"])] for t in ret["topk"]]  # fmt: skip
    return [
        (["MAP@all queries x database", "bits", "ours s", "tie-aware s", "NumPy s (extrapolated)", "speed-up",
          "tie-aware speed-up", "|MAP - NumPy stable|"], map_rows),
        (["top-k queries x database", "bits", "k", "ours s", "faiss-cpu s", "speed-up", "distances identical",
          "indices at their distance"], topk_rows),
    ]  # fmt: skip


def unavailable_notes(report: dict[str, Any]) -> list[str]:
    return [f"- {r['backend']}: {r['status']}: {r['reason']}" for r in report["encoding"] if r["status"] != "ok"]


def render_text(table: Table) -> str:
    header, rows = table
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(table: Table) -> str:
    header, rows = table
    return "\n".join("| " + " | ".join(line) + " |" for line in (header, ["---"] * len(header), *rows))


def preamble(report: dict[str, Any]) -> list[str]:
    s, m = report["settings"], report["machine"]
    return [
        f"Measured {report['date']} on {m['cpu']} ({m['cores']} cores), load average {report['load_start']} at the "
        f"start, {report['load_end']} at the end; {report['seconds']:.0f} s in all.",
        f"Model: {report['model']['description']}.",
        f"Latency: {s['warmup_ms']:.0f} ms warm-up, then at least {s['duration_s']:g} s and {s['min_iters']} "
        f"iterations per batch size; {report['conventions']}",
    ]


def text(report: dict[str, Any]) -> str:
    """The terminal report: the backend table, why some backends were not measured, retrieval."""
    parts = ["\n".join(preamble(report)), render_text(backend_table(report))]
    if notes := unavailable_notes(report):
        parts.append("Not measured:\n" + "\n".join(notes))
    parts += [render_text(t) for t in retrieval_tables(report)]
    return "\n\n".join(parts) + "\n"


def markdown(report: dict[str, Any]) -> str:
    parts = [" ".join(preamble(report)), render_markdown(backend_table(report)),
             "Latency per batch size (ms):", render_markdown(latency_table(report))]  # fmt: skip
    if notes := unavailable_notes(report):
        parts.append("Not measured:\n\n" + "\n".join(notes))
    parts += [render_markdown(t) for t in retrieval_tables(report)]
    return "\n\n".join(parts) + "\n"


def write_plots(report: dict[str, Any], folder: str | os.PathLike[str]) -> list[Path]:
    """throughput.png (images/s against batch size) and latency.png (latency distribution per batch size)."""
    from dsah_rt.plots import _pyplot

    plt = _pyplot()
    folder = Path(folder)
    measured = [r for r in report["encoding"] if r["status"] == "ok"]
    batches = report["settings"]["batch_sizes"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in measured:
        ax.plot([row["batch"] for row in r["rows"]], [row["images_per_s"] for row in r["rows"]], marker="o", label=r["backend"])
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images/s", title="Encoding throughput")
    ax.set_xticks(batches, [str(b) for b in batches])
    paths.append(_save(plt, fig, ax, folder / "throughput.png"))

    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for r in measured:
            row = next(row for row in r["rows"] if row["batch"] == batch)
            q = row["latency_quantiles_ms"]
            ax.plot(q, [100 * i / (len(q) - 1) for i in range(len(q))], label=r["backend"])
        ax.set(xscale="log", xlabel="latency ms (log)", ylabel="percentile", title=f"batch {batch}", ylim=(0, 100))
    paths.append(_save(plt, fig, axes[0][-1], folder / "latency.png"))
    return paths


def _save(plt: Any, fig: Any, legend_ax: Any, path: Path) -> Path:
    for ax in fig.axes:
        ax.grid(alpha=0.3, which="both")
    legend_ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), suffix=".png")
    plt.close(fig)
    return path
