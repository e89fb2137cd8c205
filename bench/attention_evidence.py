"""Issue 8's tables, at matched initialisation, every row `dsah-rt train`'s defaults plus the
options it names, on synthetic-fg (its default options unless --data-option says otherwise).

    python -m dsah_rt.bench.attention_evidence --out bench/results [--table acceptance|table3|table4]
        [--seeds 0 1 2] [--bits 12 24 48] [--rows saliency --rows identity] [--draws 3]
        [--data-option decoys=6] [--stem NAME]
    python -m dsah_rt.bench.attention_evidence --report A.json [--report B.json ...]

acceptance  dpsh (`--method dpsh`), saliency (`--method dsah`: the measured recipe) and identity
            (`--method dsah --ablation attention-identity`: Salmap = 1, y = x, the same losses and
            schedule without an attention network; it scores Hash(x))
table3      the paper's Table 3: Algorithm 1 (iterative) against Eq. 18 (simultaneous)
table4      the paper's Table 4 on the measured recipe: each of its loss terms switched off or back
            on, and the paper's recipe entire (`--recipe paper`)
fcn16s      DSaH with the paper's FCN-16s attention network (its controls: the acceptance table's identity and dpsh)
lite0       the acceptance rows with ImageNet efficientnet_lite0 backbones at 64 px (the other regime)
Every row trains from the same seed's hashing-network weights. MAP@all of the query split; "last
3" is the mean of the last three evaluations (every 4 epochs). Two runs at a time, one torch thread
each: sized for the 2-core machine (the acceptance table at 3 x 3 cells: about 45 minutes).

One run is one draw of a chaotic process (train-evidence.md, round 6: the same seed with the
learning rate x (1 + 1e-6) moves MAP by up to 0.08), so `--draws N` trains each cell N times, draw d
at the default learning rate x (1 + NUDGES[d]), and a seed's number is the mean of its draws. The
table adds each row's paired difference from each baseline present (dpsh, identity) and between the
two FCNs: the mean over seeds with its standard error and how many seeds are above zero. The JSON is
rewritten after every run, so a stopped table keeps what finished.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.omp import passive_openmp

EPOCHS = 60
EVAL_EVERY = 4
TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "acceptance": {
        "dpsh": {"method": "dpsh"},
        "saliency": {"method": "dsah"},
        "identity": {"method": "dsah", "ablations": ("attention-identity",)},
    },
    "table3": {
        "iterative": {"method": "dsah"},
        "simultaneous": {"method": "dsah", "mode": "simultaneous"},
    },
    "table4": {
        "measured": {"method": "dsah"},
        "+ J_sal in Eq. 14 (alpha 40)": {"method": "dsah", "alpha": 40.0},
        "hashing on y only (hash-no-ori)": {"method": "dsah", "ablations": ("hash-no-ori",)},
        "no J_reg (no-quantization)": {"method": "dsah", "ablations": ("no-quantization",)},
        "no area term": {"method": "dsah", "area": 0.0},
        "the paper's recipe": {"method": "dsah", "recipe": "paper"},
    },
    # The default's departures of rounds 7-8, each taken back alone: the attention pass from the end of
    # the warm-up whether or not the hashing network has lifted off (the default of round 7), and
    # with it the paper's FCN-16s (the default of rounds 2-6). The identity and DPSH rows have no
    # attention network, so the acceptance table's are these rows' controls.
    "nowait": {"saliency-nowait": {"method": "dsah", "attention_wait": 0.0}},
    "fcn16s": {"saliency-16s": {"method": "dsah", "fcn": "16s", "attention_wait": 0.0}},
    # The other regime (issue 8, section 4): ImageNet efficientnet_lite0 in both networks, tuned, at
    # 64 px; run with --epochs 30 --bits 24 (a 60-epoch lite0 DSaH run takes ~2.5 h on one core).
    "lite0": {
        row: {**options, "backbone": "efficientnet_lite0", "input_size": 64, "eval_every": 3}
        for row, options in (("dpsh", {"method": "dpsh"}), ("saliency", {"method": "dsah"}),
                             ("identity", {"method": "dsah", "ablations": ("attention-identity",)}))
    },  # fmt: skip
}
ROWS = TABLES["acceptance"]
# Draw d's relative change of the learning rate: draws 1 and 2 are round 6's R6c and R6d.
NUDGES = (0.0, 1e-6, -1e-6, 2e-6, -2e-6, 3e-6, -3e-6, 4e-6, -4e-6)


Job = tuple[str, str, int, int, int, dict[str, Any], str, int]


def _run(job: Job) -> dict[str, Any]:
    name, row, seed, bits, epochs, data_options, scratch, draw = job
    import torch

    from dsah_rt.native import set_threads
    from dsah_rt.train.data import load_dataset
    from dsah_rt.train.options import DEFAULT_LR, TrainOptions
    from dsah_rt.train.trainer import train

    torch.set_num_threads(1)
    set_threads(1)
    data = load_dataset("synthetic-fg", seed=0, **data_options)
    options = {"backbone": "small", "eval_every": EVAL_EVERY, **TABLES[name][row]}
    if draw:  # draw 0 leaves lr unset: exactly `dsah-rt train`'s default
        options["lr"] = DEFAULT_LR[options.get("optimizer", "adam")] * (1 + NUDGES[draw])
    opts = TrainOptions(data_options=data_options, bits=bits, epochs=epochs, seed=seed, device="cpu", **options)
    run_dir = Path(scratch) / f"{name}-{list(TABLES[name]).index(row)}-{bits}-{seed}-{draw}"
    start = time.perf_counter()
    metrics = train(opts, run_dir, data=data, echo=lambda line: None, progress=io.StringIO())
    evaluated = [m for m in metrics if "map" in m]
    record = {
        "row": row, "seed": seed, "bits": bits, "draw": draw, "lr": opts.resolved().lr,
        "seconds": time.perf_counter() - start, "map_last3": float(np.mean([m["map"] for m in evaluated[-3:]])),
        "maps": [m["map"] for m in evaluated], "localisation": [m.get("localisation") for m in evaluated],
        # the map's share of the image and entropy (1.0 = flat) in the last pass that used it
        # the first epoch (1-based) whose passes trained the attention network: a wait or warm-up delays it
        "attention_from": next((i + 1 for i, m in enumerate(metrics) if "attention" in m["loss"]), None),
        "map_stats": next(({k: d[k] for k in ("map_mean", "map_entropy")} for d in reversed(metrics[-1]["diagnostics"].values())
                           if "map_mean" in d), None),
    }  # fmt: skip
    loc = evaluated[-1].get("localisation")
    print(f"[{time.strftime('%H:%M:%S')}] {row} {bits} bits seed {seed} draw {draw}: MAP {record['map_last3']:.4f}"
          + (f", localisation {loc:.2f}" if loc is not None else ""), flush=True)
    return record


BASELINES = ("dpsh", "identity")
# Rows compared directly where both are present: the default against round 7's (no wait for lift-off),
# and that against the paper's FCN-16s.
CONTRASTS = (("saliency", "saliency-nowait"), ("saliency-nowait", "saliency-16s"))


def _cells(records: list[dict[str, Any]]) -> dict[tuple[str, int, int], list[dict[str, Any]]]:
    """Records by (row, bits, seed), each cell's draws in draw order (records without `draw` are draw 0)."""
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r.get("draw", 0)):
        cells.setdefault((r["row"], r["bits"], r["seed"]), []).append(r)
    return cells


def _seed_map(cells, key: tuple[str, int, int]) -> float:
    return float(np.mean([r["map_last3"] for r in cells[key]]))


def _paired(cells, row: str, base: str, bits: int, seeds: list[int]) -> np.ndarray:
    """row - base per seed, over the seeds that have both."""
    both = [s for s in seeds if (row, bits, s) in cells and (base, bits, s) in cells]
    return np.array([_seed_map(cells, (row, bits, s)) - _seed_map(cells, (base, bits, s)) for s in both])


def table(records: list[dict[str, Any]], rows: list[str]) -> str:
    """The summary and the per-seed table of a set of records (one run, or several files' records).

    A seed's MAP is the mean of its draws. Summary, per code length: each row's mean over its seeds
    with their standard deviation; each row's paired difference from each baseline present (dpsh,
    identity) and of each pair in CONTRASTS, over the seeds both have: mean +- standard error and how
    many seeds are above zero; the localisation of every run with a saliency map at its last
    evaluation. Per seed: each draw's MAP and the paired differences."""
    cells = _cells(records)
    bits = sorted({k for _, k, _ in cells})
    diffs = [(row, base) for base in BASELINES if base in rows for row in rows if row not in BASELINES]
    diffs += [(a, b) for a, b in CONTRASTS if a in rows and b in rows]
    header = rows + [f"{row} - {base} (paired)" for row, base in diffs]
    lines = ["| bits | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    seeds_of = {k: sorted({s for _, kk, s in cells if kk == k}) for k in bits}
    for k in bits:
        out = []
        for row in rows:
            means = np.array([_seed_map(cells, (row, k, s)) for s in seeds_of[k] if (row, k, s) in cells])
            runs = sum(len(cells[row, k, s]) for s in seeds_of[k] if (row, k, s) in cells)
            out.append(f"**{means.mean():.3f}** +- {means.std(ddof=1):.3f} ({len(means)} seeds, {runs} runs)" if len(means) > 1
                       else (f"**{means.mean():.3f}** (1 seed, {runs} runs)" if len(means) else "-"))  # fmt: skip
        for row, base in diffs:
            gain = _paired(cells, row, base, k, seeds_of[k])
            error = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("nan")
            out.append(f"{gain.mean():+.3f} +- {error:.3f} ({(gain > 0).sum()} of {len(gain)} seeds above 0)" if len(gain) else "-")
        lines.append(f"| {k} | " + " | ".join(out) + " |")
    for k in bits:
        for row in rows:
            locs = [r["localisation"][-1] for s in seeds_of[k] for r in cells.get((row, k, s), [])
                    if r["localisation"] and r["localisation"][-1] is not None]  # fmt: skip
            if locs and row != "identity":  # the identity's map is flat by construction
                lines += ["", f"Localisation of {row} at {k} bits, last evaluation (1.0 = flat map): mean {np.mean(locs):.2f}, "
                          f"min {min(locs):.2f}, {sum(x < 2.0 for x in locs)} of {len(locs)} runs under 2.0."]  # fmt: skip
    lines += ["", "| bits | seed | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for k in bits:
        for s in seeds_of[k]:
            out = [" / ".join(f"{r['map_last3']:.3f}" for r in cells.get((row, k, s), [])) or "-" for row in rows]
            for row, base in diffs:
                gain = _paired(cells, row, base, k, [s])
                out.append(f"{gain[0]:+.3f}" if len(gain) else "-")
            lines.append(f"| {k} | {s} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def read_records(paths: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of one or more of this script's JSON files, and their rows in table order."""
    records = [r for path in paths for r in json.loads(Path(path).read_text())["records"]]
    order = [row for rows in TABLES.values() for row in rows]
    return records, sorted({r["row"] for r in records}, key=lambda row: order.index(row) if row in order else len(order))


@click.command()
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the JSON and markdown (required to train).")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Train nothing: print the table of these JSON files' records together (repeatable).")
@click.option("--table", "name", type=click.Choice(list(TABLES)), default="acceptance", show_default=True)
@click.option("--data-option", "data_option", multiple=True, metavar="KEY=VALUE",
              help="A synthetic-fg option, e.g. decoys=6 (repeatable): another regime.")
@click.option("--seeds", type=int, multiple=True, default=(0, 1, 2), show_default=True)
@click.option("--bits", type=int, multiple=True, default=(12, 24, 48), show_default=True)
@click.option("--rows", "only", multiple=True, help="Train only these rows of the table (repeatable; default: all).")
@click.option("--draws", type=click.IntRange(1, len(NUDGES)), default=1, show_default=True,
              help="Runs per cell, draw d at the default learning rate x (1 + NUDGES[d]).")
@click.option("--epochs", type=int, default=EPOCHS, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Runs at a time, one torch thread each.")
@click.option("--stem", help="Output file name without extension (default: from the table's name).")
@click.option("--quick", is_flag=True, help="A smoke test of the script on tiny data, not evidence.")
def main(out: str | None, reports: tuple[str, ...], name: str, data_option: tuple[str, ...], seeds: tuple[int, ...], bits: tuple[int, ...],
         only: tuple[str, ...], draws: int, epochs: int, workers: int, stem: str | None, quick: bool) -> None:  # fmt: skip
    if reports:
        click.echo(table(*read_records(list(reports))))
        return
    if not out:
        raise click.UsageError("--out is required to train (or --report FILE to print recorded runs)")
    passive_openmp()
    from dsah_rt.atomic import write_json, write_text
    from dsah_rt.train.cli import parse_option

    unknown = sorted(set(only) - set(TABLES[name]))
    if unknown:
        raise click.UsageError(f"--rows {unknown[0]}: table {name} has rows {', '.join(TABLES[name])}")
    data_options = dict(parse_option(o) for o in data_option)
    if quick:
        data_options.update({"num_classes": 3, "image_size": 32, "train_per_class": 8, "query_per_class": 2})
    rows = [row for row in TABLES[name] if not only or row in only]
    Path(out).mkdir(parents=True, exist_ok=True)
    stem = stem or "attention-evidence" + ("" if name == "acceptance" else f"-{name}") + ("-quick" if quick else "")
    result = {"machine": f"{platform.platform()}, 2 workers x 1 torch thread", "table": name, "epochs": epochs,
              "eval_every": EVAL_EVERY, "draws": draws, "rows": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in o.items()}
                                                                for k, o in TABLES[name].items() if k in rows},
              "data_options": data_options, "records": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(name, row, s, k, epochs, data_options, scratch, d)
                for k in bits for s in seeds for d in range(draws) for row in rows]  # fmt: skip
        jobs.sort(key=lambda job: TABLES[name][job[1]]["method"] == "dpsh")  # the long runs first: the pool drains evenly
        with mp.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap_unordered(_run, jobs, chunksize=1):
                result["records"].append(record)
                write_json(Path(out) / f"{stem}.json", result)
    md = table(result["records"], rows)
    write_text(Path(out) / f"{stem}.md", md + "\n")
    click.echo(md)


if __name__ == "__main__":
    main()
