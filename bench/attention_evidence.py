"""Issue 8's acceptance table: the saliency method against DPSH and against its own attention
replaced by the identity, at matched initialisation, on synthetic-fg's default options.

    python -m dsah_rt.bench.attention_evidence --out bench/results [--seeds 0 1 2] [--bits 12 24 48]

Rows, each trained from the same seed's hashing-network weights (matched initialisation):
  dpsh      `dsah-rt train --method dpsh --eta 0.01 --lr LR[bits]`: the baseline at the eta and
            learning rate its validation split chose per code length (train-evidence.md, round 2)
  saliency  `dsah-rt train --method saliency-dpsh --warmup-epochs 10 --ablation attention-no-sal
            --saliency-area 300 --refit-epochs 20`: the attention localises (round 1b), then the
            hashing network is fitted to the settled map (round 2)
  identity  the same configuration plus `--ablation attention-identity` (Salmap = 1, y = x): the
            same losses and schedule without an attention network; it scores Hash(x)
MAP@all of the query split; "last 3" is the mean of the last three evaluations (every 4 epochs).
Two runs at a time, one torch thread each: sized for the 2-core machine (about 45 minutes).
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
SALIENCY = {"method": "saliency-dpsh", "warmup_epochs": 10, "ablations": ("attention-no-sal",), "area": 300.0,
            "refit_epochs": 20}  # fmt: skip
ROWS = {
    "dpsh": {"method": "dpsh", "eta": 0.01},
    "saliency": SALIENCY,
    "identity": {**SALIENCY, "ablations": (*SALIENCY["ablations"], "attention-identity")},
}
# DPSH's learning rate per code length, chosen on the validation split (round 2, R2a)
DPSH_LR = {12: 1e-3, 24: 3e-4, 48: 3e-4}


def _run(job: tuple[str, int, int, int, dict[str, Any], str]) -> dict[str, Any]:
    row, seed, bits, epochs, data_options, scratch = job
    import torch

    from dsah_rt.hamming import set_threads
    from dsah_rt.train.data import load_dataset
    from dsah_rt.train.options import TrainOptions
    from dsah_rt.train.trainer import train

    torch.set_num_threads(1)
    set_threads(1)
    data = load_dataset("synthetic-fg", seed=0, **data_options)
    options = {**ROWS[row], "lr": DPSH_LR.get(bits)} if row == "dpsh" else dict(ROWS[row])
    for stage in ("warmup_epochs", "refit_epochs"):  # the same shares of a shorter (--quick) budget
        if stage in options:
            options[stage] = round(options[stage] * epochs / EPOCHS)
    opts = TrainOptions(backbone="small", bits=bits, epochs=epochs, seed=seed, device="cpu", eval_every=EVAL_EVERY,
                        **options)  # fmt: skip
    run_dir = Path(scratch) / f"{row}-{bits}-{seed}"
    start = time.perf_counter()
    metrics = train(opts, run_dir, data=data, echo=lambda line: None, progress=io.StringIO())
    evaluated = [m for m in metrics if "map" in m]
    record = {
        "row": row, "seed": seed, "bits": bits, "seconds": time.perf_counter() - start,
        "map_last3": float(np.mean([m["map"] for m in evaluated[-3:]])),
        "maps": [m["map"] for m in evaluated], "localisation": [m.get("localisation") for m in evaluated],
    }  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {row} {bits} bits seed {seed}: MAP {record['map_last3']:.4f}"
          + (f", localisation {evaluated[-1]['localisation']:.2f}" if row == "saliency" else ""), flush=True)
    return record


def table(records: list[dict[str, Any]], bits: list[int], seeds: list[int]) -> str:
    lines = ["| bits | " + " | ".join(f"{r} (seeds {', '.join(map(str, seeds))}; mean)" for r in ROWS) + " |",
             "|---|" + "---|" * len(ROWS)]  # fmt: skip
    for k in bits:
        cells = []
        for row in ROWS:
            maps = [next(r["map_last3"] for r in records if (r["row"], r["bits"], r["seed"]) == (row, k, s)) for s in seeds]
            cells.append(" / ".join(f"{m:.3f}" for m in maps) + f"; **{np.mean(maps):.3f}**")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    locs = [r["localisation"][-1] for r in records if r["row"] == "saliency"]
    lines += ["", f"Localisation of the saliency rows at the last evaluation (1.0 = flat map): "
              f"{', '.join(f'{x:.2f}' for x in locs)} (min {min(locs):.2f})."]  # fmt: skip
    return "\n".join(lines)


@click.command()
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--seeds", type=int, multiple=True, default=(0, 1, 2), show_default=True)
@click.option("--bits", type=int, multiple=True, default=(12, 24, 48), show_default=True)
@click.option("--epochs", type=int, default=EPOCHS, show_default=True)
@click.option("--quick", is_flag=True, help="A smoke test of the script on tiny data, not evidence.")
def main(out: str, seeds: tuple[int, ...], bits: tuple[int, ...], epochs: int, quick: bool) -> None:
    passive_openmp()
    from dsah_rt.atomic import write_json, write_text

    data_options = {"num_classes": 3, "image_size": 32, "train_per_class": 8, "query_per_class": 2} if quick else {}
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(row, s, k, epochs, data_options, scratch) for k in bits for s in seeds for row in ROWS]
        jobs.sort(key=lambda job: job[0] != "saliency")  # the long runs first, so the pool drains evenly
        with mp.get_context("spawn").Pool(2) as pool:
            records = pool.map(_run, jobs, chunksize=1)
    md = table(records, list(bits), list(seeds))
    result = {"machine": f"{platform.platform()}, 2 workers x 1 torch thread", "epochs": epochs,
              "eval_every": EVAL_EVERY, "rows": {k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in o.items()}
                                                  for k, o in ROWS.items()},
              "data_options": data_options, "records": records}  # fmt: skip
    name = "attention-evidence-quick" if quick else "attention-evidence"
    write_json(Path(out) / f"{name}.json", result)
    write_text(Path(out) / f"{name}.md", md + "\n")
    click.echo(md)


if __name__ == "__main__":
    main()
