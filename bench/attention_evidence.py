"""Issue 8's tables, at matched initialisation, every row `dsah-rt train`'s defaults plus the
options it names, on synthetic-fg (its default options unless --data-option says otherwise).

    python -m dsah_rt.bench.attention_evidence --out bench/results [--table acceptance|table3|table4]
        [--seeds 0 1 2] [--bits 12 24 48] [--data-option decoys=6]

acceptance  dpsh (`--method dpsh`), saliency (`--method dsah`: the measured recipe) and identity
            (`--method dsah --ablation attention-identity`: Salmap = 1, y = x, the same losses and
            schedule without an attention network; it scores Hash(x))
table3      the paper's Table 3: Algorithm 1 (iterative) against Eq. 18 (simultaneous)
table4      the paper's Table 4 on the measured recipe: each of its loss terms switched off or back
            on, and the paper's recipe entire (`--recipe paper`)
lite0       the acceptance rows with ImageNet efficientnet_lite0 backbones at 64 px (the other regime)
Every row trains from the same seed's hashing-network weights. MAP@all of the query split; "last
3" is the mean of the last three evaluations (every 4 epochs). Two runs at a time, one torch thread
each: sized for the 2-core machine (the acceptance table at 3 x 3 cells: about 45 minutes).
"""

from __future__ import annotations

import io
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
    # The other regime (issue 8, section 4): ImageNet efficientnet_lite0 in both networks, tuned, at
    # 64 px; run with --epochs 30 --bits 24 (a 60-epoch lite0 DSaH run takes ~2.5 h on one core).
    "lite0": {
        row: {**options, "backbone": "efficientnet_lite0", "input_size": 64, "eval_every": 3}
        for row, options in (("dpsh", {"method": "dpsh"}), ("saliency", {"method": "dsah"}),
                             ("identity", {"method": "dsah", "ablations": ("attention-identity",)}))
    },  # fmt: skip
}
ROWS = TABLES["acceptance"]


def _run(job: tuple[str, str, int, int, int, dict[str, Any], str]) -> dict[str, Any]:
    name, row, seed, bits, epochs, data_options, scratch = job
    import torch

    from dsah_rt.hamming import set_threads
    from dsah_rt.train.data import load_dataset
    from dsah_rt.train.options import TrainOptions
    from dsah_rt.train.trainer import train

    torch.set_num_threads(1)
    set_threads(1)
    data = load_dataset("synthetic-fg", seed=0, **data_options)
    options = {"backbone": "small", "eval_every": EVAL_EVERY, **TABLES[name][row]}
    opts = TrainOptions(data_options=data_options, bits=bits, epochs=epochs, seed=seed, device="cpu", **options)
    run_dir = Path(scratch) / f"{name}-{list(TABLES[name]).index(row)}-{bits}-{seed}"
    start = time.perf_counter()
    metrics = train(opts, run_dir, data=data, echo=lambda line: None, progress=io.StringIO())
    evaluated = [m for m in metrics if "map" in m]
    record = {
        "row": row, "seed": seed, "bits": bits, "seconds": time.perf_counter() - start,
        "map_last3": float(np.mean([m["map"] for m in evaluated[-3:]])),
        "maps": [m["map"] for m in evaluated], "localisation": [m.get("localisation") for m in evaluated],
    }  # fmt: skip
    loc = evaluated[-1].get("localisation")
    print(f"[{time.strftime('%H:%M:%S')}] {row} {bits} bits seed {seed}: MAP {record['map_last3']:.4f}"
          + (f", localisation {loc:.2f}" if loc is not None else ""), flush=True)
    return record


def table(records: list[dict[str, Any]], rows: list[str], bits: list[int], seeds: list[int]) -> str:
    """One column per row of the table, one line per code length: each seed's MAP, then the mean;
    then the last localisation of every run that has a saliency map."""
    lines = ["| bits | " + " | ".join(f"{r} (seeds {', '.join(map(str, seeds))}; mean)" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]  # fmt: skip
    for k in bits:
        cells = []
        for row in rows:
            maps = [next(r["map_last3"] for r in records if (r["row"], r["bits"], r["seed"]) == (row, k, s)) for s in seeds]
            cells.append(" / ".join(f"{m:.3f}" for m in maps) + f"; **{np.mean(maps):.3f}**")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for row in rows:
        locs = [r["localisation"][-1] for r in records if r["row"] == row and r["localisation"][-1] is not None]
        if locs and row != "identity":  # the identity's map is flat by construction
            lines += ["", f"Localisation of {row} at the last evaluation (1.0 = flat map): "
                      f"{', '.join(f'{x:.2f}' for x in locs)} (min {min(locs):.2f})."]  # fmt: skip
    return "\n".join(lines)


@click.command()
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--table", "name", type=click.Choice(list(TABLES)), default="acceptance", show_default=True)
@click.option("--data-option", "data_option", multiple=True, metavar="KEY=VALUE",
              help="A synthetic-fg option, e.g. decoys=6 (repeatable): another regime.")
@click.option("--seeds", type=int, multiple=True, default=(0, 1, 2), show_default=True)
@click.option("--bits", type=int, multiple=True, default=(12, 24, 48), show_default=True)
@click.option("--epochs", type=int, default=EPOCHS, show_default=True)
@click.option("--quick", is_flag=True, help="A smoke test of the script on tiny data, not evidence.")
def main(out: str, name: str, data_option: tuple[str, ...], seeds: tuple[int, ...], bits: tuple[int, ...],
         epochs: int, quick: bool) -> None:  # fmt: skip
    passive_openmp()
    from dsah_rt.atomic import write_json, write_text
    from dsah_rt.train.cli import parse_option

    data_options = dict(parse_option(o) for o in data_option)
    if quick:
        data_options.update({"num_classes": 3, "image_size": 32, "train_per_class": 8, "query_per_class": 2})
    rows = list(TABLES[name])
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(name, row, s, k, epochs, data_options, scratch) for k in bits for s in seeds for row in rows]
        jobs.sort(key=lambda job: TABLES[name][job[1]]["method"] == "dpsh")  # the long runs first: the pool drains evenly
        with mp.get_context("spawn").Pool(2) as pool:
            records = pool.map(_run, jobs, chunksize=1)
    md = table(records, rows, list(bits), list(seeds))
    result = {"machine": f"{platform.platform()}, 2 workers x 1 torch thread", "table": name, "epochs": epochs,
              "eval_every": EVAL_EVERY, "rows": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in o.items()}
                                                  for k, o in TABLES[name].items()},
              "data_options": data_options, "records": records}  # fmt: skip
    stem = "attention-evidence" + ("" if name == "acceptance" else f"-{name}") + ("-quick" if quick else "")
    write_json(Path(out) / f"{stem}.json", result)
    write_text(Path(out) / f"{stem}.md", md + "\n")
    click.echo(md)


if __name__ == "__main__":
    main()
