"""Measured evidence for the training stage: DSaH vs DPSH, Table 3, Table 4, margin units, digits.

    python -m dsah_rt.bench.train_evidence --out bench/results
    python -m dsah_rt.bench.train_evidence --out bench/results --only semantic-norm

`--only semantic-norm` runs just the J_sem norm comparison (abs vs square, about 16 minutes) and
writes it as one section into the existing files, before the hand-written notes.

Everything runs on one CPU thread (torch and numba) so that a shared 2-core machine keeps a core
free; the budget (dataset size, input size, epochs) is sized for about 25 minutes there.

Protocol, so that nothing is tuned on the query set:
  1. On a validation split carved from synthetic-fg's *training* set (the last VAL_PER_CLASS
     training images of each class are the queries, the rest both train and database), each
     method picks its learning rate from LRS, and the saliency-margin units are compared.
  2. With those choices fixed, every table trains on the full training set and reports MAP of the
     query split against the database after the last epoch (no early stopping).
Results: `train-evidence.json` (all per-epoch metrics) and `train-evidence.md` (the tables).

This is the first round's protocol (validation-split choices at a 25-minute budget). The tables the
README's training section quotes at the current defaults (DSaH against DPSH and the identity control
over many seeds, Tables 3 and 4, the efficientnet_lite0 regime) come from `python -m
dsah_rt.bench.attention_evidence`, which records every run and prints the paired table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsah_rt.atomic import atomic_write, write_json
from dsah_rt.codes import binarize, pack
from dsah_rt.native import set_threads
from dsah_rt.train.data import RetrievalData, Split, load_dataset
from dsah_rt.train.data.torch_dataset import TorchSplit
from dsah_rt.train.evaluation import evaluate_keeping_threads
from dsah_rt.train.losses import NORMS
from dsah_rt.train.options import TrainOptions
from dsah_rt.train.run_dir import load_run
from dsah_rt.train.trainer import train

FG_OPTIONS = {"num_classes": 4}  # synthetic-fg's other options at their defaults (64x64, 100/30 per class, 2 decoys)
VAL_PER_CLASS = 20
BITS = (12, 24, 48)
ABLATION_BITS = 12
LRS = (3e-4, 1e-3)
OPTIMIZER = "adam"
MARGIN_SEEDS = (0, 1)
NORM_SEEDS = (0, 1, 2, 3)
NORM_HEADING = "## Semantic norm: |error| (Eq. 6 as written) vs error^2"
NOTES_HEADING = "## Reading the numbers"
PRETRAINED = {"backbone": "efficientnet_lite0", "weights": "imagenet", "epochs": 5}
ABLATION_ROWS = {  # Table 4: (hashing network, attention network) -> our switches
    ("J_sem + J_sal", "J_sem + J_sal"): ("hash-sal",),
    ("J_sem", "J_sem"): ("attention-no-sal",),
    ("J_sem", "J_sal"): ("attention-no-sem",),
    ("J_sem", "J_sem + J_sal"): (),
}


def validation_split(data: RetrievalData, per_class: int) -> RetrievalData:
    """The last `per_class` training images of each class as queries; the rest train and database."""
    labels = data.train.labels
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        held[np.flatnonzero(labels == c)[-per_class:]] = True
    fit = data.train.subset(np.flatnonzero(~held))
    return RetrievalData(f"{data.name}-val", fit, data.train.subset(np.flatnonzero(held)), fit,
                         data.num_classes, data.multilabel)  # fmt: skip


@torch.no_grad()
def hash_only_map(run_dir: Path, data: RetrievalData, size: int) -> float:
    """MAP of a DSaH run's hashing network on the original images, bypassing the attention network."""
    model, _ = load_run(run_dir)

    def codes(split: Split) -> np.ndarray:
        loader = torch.utils.data.DataLoader(TorchSplit(split, size), batch_size=128)
        return np.concatenate([pack(binarize(model.hashing(x).numpy())) for x, *_ in loader])

    bits = model.hashing.bits
    return evaluate_keeping_threads(codes(data.query), codes(data.database), data.query.labels,
                                    data.database.labels, bits=bits).map  # fmt: skip


class Runner:
    """Trains runs in a scratch folder and keeps a record of each."""

    def __init__(self, scratch: Path, epochs: int, log: io.TextIOBase) -> None:
        self.scratch, self.epochs, self.log = scratch, epochs, log
        self.records: list[dict[str, Any]] = []

    def __call__(self, tag: str, data: RetrievalData, **options: Any) -> dict[str, Any]:
        opts = TrainOptions(**{"epochs": self.epochs, "optimizer": OPTIMIZER, "device": "cpu", **options})
        run_dir = self.scratch / f"run-{len(self.records)}"
        start = time.perf_counter()
        metrics = train(opts, run_dir, data=data, echo=lambda line: None, progress=io.StringIO())
        seconds = time.perf_counter() - start
        last = metrics[-1]
        record = {
            "tag": tag, "data": data.name, "options": options,
            "map": last["map"], "map_tie_aware": last["map_tie_aware"], "localisation": last.get("localisation"),
            "map_hash_only": hash_only_map(run_dir, data, opts.input_size) if opts.method == "dsah" else None,
            "seconds": seconds, "epochs": metrics,
        }  # fmt: skip
        self.records.append(record)
        loc = "" if record["localisation"] is None else f" localisation {record['localisation']:.2f}"
        print(f"[{time.strftime('%H:%M:%S')}] {tag}: MAP {record['map']:.4f}{loc} ({record['seconds']:.0f} s)",
              file=self.log, flush=True)  # fmt: skip
        return record


def _fg(quick: bool) -> tuple[RetrievalData, RetrievalData, dict[str, Any]]:
    """synthetic-fg, its validation split, and the training options every synthetic-fg run shares."""
    options = FG_OPTIONS
    if quick:  # a smoke test of the script, not evidence
        options = {"num_classes": 3, "image_size": 32, "train_per_class": 8, "query_per_class": 2}
    fg = load_dataset("synthetic-fg", seed=0, **options)
    val = validation_split(fg, 2 if quick else VAL_PER_CLASS)
    return fg, val, {"backbone": "small", "input_size": 32 if quick else 64, "batch_size": 8 if quick else 32}


def _best_lr(records: dict[tuple[str, float], dict[str, Any]], key: str) -> float:
    return max(LRS, key=lambda lr: records[(key, lr)]["map"])


def run_all(scratch: Path, epochs: int, quick: bool) -> dict[str, Any]:
    fg, val, common = _fg(quick)
    digits = load_dataset("digits", seed=0)
    if quick:
        digits = RetrievalData("digits", digits.train.subset(np.arange(40)), digits.query.subset(np.arange(10)),
                               digits.database.subset(np.arange(40)), 10, False)  # fmt: skip
    run = Runner(scratch, epochs, sys.stderr)

    # 1. learning rate per method, on the validation split
    lr_records = {(m, lr): run(f"val {m} lr={lr}", val, method=m, lr=lr, bits=BITS[0], **common)
                  for m in ("dsah", "dpsh") for lr in LRS}  # fmt: skip
    lr = {m: _best_lr(lr_records, m) for m in ("dsah", "dpsh")}

    # 2. saliency-margin units, on the validation split (seed 0 of "bits" is step 1's run)
    margin = {(units, seed): (lr_records[("dsah", lr["dsah"])] if (units, seed) == ("bits", 0) else
                              run(f"val dsah margin-units={units} seed={seed}", val, method="dsah", lr=lr["dsah"],
                                  bits=BITS[0], margin_units=units, seed=seed, **common))
              for units in ("bits", "unit") for seed in MARGIN_SEEDS}  # fmt: skip

    # 3. DSaH vs DPSH (iterative = Table 3's first row), 4. simultaneous, 5. Table 4, 6. digits
    main = {(m, k): run(f"fg {m} {k} bits", fg, method=m, lr=lr[m], bits=k, **common)
            for m in ("dsah", "dpsh") for k in BITS}  # fmt: skip
    simultaneous = {k: run(f"fg dsah simultaneous {k} bits", fg, method="dsah", mode="simultaneous", lr=lr["dsah"],
                           bits=k, **common) for k in BITS}  # fmt: skip
    ablation = {row: (main[("dsah", ABLATION_BITS)] if not switches else
                      run(f"fg dsah ablation {'+'.join(switches)}", fg, method="dsah", lr=lr["dsah"],
                          bits=ABLATION_BITS, ablations=switches, **common))
                for row, switches in ABLATION_ROWS.items()}  # fmt: skip
    digit_runs = {m: run(f"digits {m} 12 bits", digits, method=m, lr=lr[m], bits=12, backbone="small",
                         input_size=32, batch_size=common["batch_size"]) for m in ("dsah", "dpsh")}  # fmt: skip
    # 7. the same comparison from ImageNet weights (a shorter budget: the backbone is ~10x slower)
    pretrained_opts = {**common, **PRETRAINED, "epochs": 1 if quick else PRETRAINED["epochs"]}
    pretrained = {m: run(f"fg {m} 12 bits {PRETRAINED['backbone']} imagenet", fg, method=m, lr=lr[m], bits=12,
                         **pretrained_opts) for m in ("dsah", "dpsh")}  # fmt: skip
    return {
        "lr": lr, "lr_records": lr_records, "margin": margin, "main": main, "simultaneous": simultaneous,
        "ablation": ablation, "digits": digit_runs, "pretrained": pretrained, "records": run.records,
    }


def run_semantic_norm(scratch: Path, epochs: int, quick: bool) -> dict[str, Any]:
    """J_sem's norm, abs vs square: each picks its DSaH learning rate on the validation split
    (seed 0), the two are compared there over NORM_SEEDS, and then DSaH with each norm and DPSH
    train on the full synthetic-fg at every code length, as in run_all's main table."""
    fg, val, common = _fg(quick)
    run = Runner(scratch, epochs, sys.stderr)
    methods = {norm: {"method": "dsah", "semantic_norm": norm} for norm in NORMS} | {"dpsh": {"method": "dpsh"}}
    lr_records = {(key, lr): run(f"val {key} lr={lr}", val, lr=lr, bits=BITS[0], **opts, **common)
                  for key, opts in methods.items() for lr in LRS}  # fmt: skip
    lr = {key: _best_lr(lr_records, key) for key in methods}
    seeds = {(norm, seed): (lr_records[(norm, lr[norm])] if seed == 0 else
                            run(f"val {norm} lr={lr[norm]} seed={seed}", val, lr=lr[norm], bits=BITS[0], seed=seed,
                                **methods[norm], **common))
             for norm in NORMS for seed in NORM_SEEDS}  # fmt: skip
    main = {(key, k): run(f"fg {key} {k} bits", fg, lr=lr[key], bits=k, **opts, **common)
            for key, opts in methods.items() for k in BITS}  # fmt: skip
    return {"lr": lr, "lr_records": lr_records, "seeds": seeds, "main": main, "records": run.records}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def report(results: dict[str, Any], command: str, epochs: int, seconds: float) -> str:
    main, sim, abl = results["main"], results["simultaneous"], results["ablation"]
    machine = f"{platform.platform()}, {platform.machine()}, torch {torch.__version__}, 1 thread"
    lines = [
        "# Training evidence",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='minutes')}; wall time {seconds / 60:.1f} min",
        f"- Machine: {machine}",
        f"- Data: synthetic-fg {json.dumps(FG_OPTIONS)} (others default: 64x64, 100 train / 30 query per class, "
        f"2 decoys; database = train), seed 0. digits: scikit-learn's 8x8 digits at input 32.",
        f"- Model: backbone `small` (random init), batch 32, {epochs} epochs, optimiser {OPTIMIZER}, weight decay 5e-4, "
        f"lambda 30 / alpha 40 / m = k/4 (simultaneous: lambda 60, alpha 0.01), J_sem norm "
        f"`{TrainOptions.semantic_norm}`. MAP is after the last epoch, "
        "query vs database, via dsah_rt.metrics.evaluate (index-order ties).",
        f"- Learning rate per method chosen on a validation split of the training set (last {VAL_PER_CLASS} train "
        f"images per class as queries) from {list(LRS)}: DSaH {results['lr']['dsah']}, DPSH {results['lr']['dpsh']}.",
        "",
        "## Validation: learning rate",
        "",
        "| method | lr | val MAP (12 bits) |",
        "|---|---|---|",
        *[f"| {m} | {lr} | {_f(r['map'])} |" for (m, lr), r in results["lr_records"].items()],
        "",
        "## Validation: saliency-margin units (DSaH, 12 bits, m = k/4 = 3)",
        "",
        "| units | seed | val MAP | localisation | mean J_sal per batch (last epoch) |",
        "|---|---|---|---|---|",
        *[f"| {u} | {seed} | {_f(r['map'])} | {_f(r['localisation'])} | {r['epochs'][-1]['loss']['attention']['sal']:.1f} |"
          for (u, seed), r in results["margin"].items()],
        "",
        "## DSaH vs DPSH on synthetic-fg (MAP)",
        "",
        "| method | " + " | ".join(f"{k} bits" for k in BITS) + " |",
        "|---|" + "---|" * len(BITS),
        *[f"| {m.upper()} | " + " | ".join(_f(main[(m, k)]["map"]) for k in BITS) + " |" for m in ("dsah", "dpsh")],
        "| DSaH's hashing network on the original images (no attention) | "
        + " | ".join(_f(main[("dsah", k)]["map_hash_only"]) for k in BITS) + " |",
        "",
        "## Saliency localisation per epoch (DSaH, query split; 1.0 = no localisation)",
        "",
        "| epoch | " + " | ".join(f"{k} bits" for k in BITS) + " |",
        "|---|" + "---|" * len(BITS),
        *[f"| {e + 1} | " + " | ".join(_f(main[("dsah", k)]["epochs"][e].get("localisation")) for k in BITS) + " |"
          for e in range(epochs)],
        "",
        "## Table 3: training methods (MAP)",
        "",
        "| method | " + " | ".join(f"{k} bits" for k in BITS) + " |",
        "|---|" + "---|" * len(BITS),
        "| Iterative (Algorithm 1) | " + " | ".join(_f(main[("dsah", k)]["map"]) for k in BITS) + " |",
        "| Simultaneous (Eq. 18) | " + " | ".join(_f(sim[k]["map"]) for k in BITS) + " |",
        "",
        f"## Table 4: loss components ({ABLATION_BITS} bits, MAP)",
        "",
        "| hashing network | attention network | MAP | localisation | MAP of Hash(x) |",
        "|---|---|---|---|---|",
        *[f"| {h} | {a} | {_f(r['map'])} | {_f(r['localisation'])} | {_f(r['map_hash_only'])} |"
          for (h, a), r in abl.items()],
        "",
        "## digits (12 bits, MAP)",
        "",
        "| method | MAP |",
        "|---|---|",
        *[f"| {m.upper()} | {_f(r['map'])} |" for m, r in results["digits"].items()],
        "",
        f"## From ImageNet weights: {PRETRAINED['backbone']}, 12 bits, input 64, {PRETRAINED['epochs']} epochs",
        "",
        "| method | MAP | localisation | MAP of Hash(x) |",
        "|---|---|---|---|",
        *[f"| {m.upper()} | {_f(r['map'])} | {_f(r['localisation'])} | {_f(r['map_hash_only'])} |"
          for m, r in results["pretrained"].items()],
        "",
        "## Runs",
        "",
        "| run | MAP | seconds |",
        "|---|---|---|",
        *[f"| {r['tag']} | {_f(r['map'])} | {r['seconds']:.0f} |" for r in results["records"]],
        "",
    ]
    return "\n".join(lines)


def report_semantic_norm(results: dict[str, Any], command: str, epochs: int, seconds: float) -> str:
    """One section (its own `##` heading, `###` inside) for the existing train-evidence.md."""
    main, seeds, lr = results["main"], results["seeds"], results["lr"]
    mean = {norm: float(np.mean([seeds[(norm, s)]["map"] for s in NORM_SEEDS])) for norm in NORMS}
    label = {"abs": "DSaH, abs", "square": "DSaH, square", "dpsh": "DPSH"}
    bits_header = ["| method | " + " | ".join(f"{k} bits" for k in BITS) + " |", "|---|" + "---|" * len(BITS)]

    def row(name: str, key: str, field: str) -> str:
        return f"| {name} | " + " | ".join(_f(main[(key, k)][field]) for k in BITS) + " |"

    lines = [
        NORM_HEADING,
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='minutes')}; wall time {seconds / 60:.1f} min",
        f"- Settings as above ({epochs} epochs, synthetic-fg, `small`, Adam, batch 32, margin units `bits`). "
        "J_sem (Eq. 6-7) sums |S - (u.u+k)/2k| (`--semantic-norm abs`) or its square (`square`); "
        "Eq. 9's d_ij stays the absolute error in both. Every run below is fresh, none is copied from the tables "
        "above.",
        f"- Learning rate per variant chosen on the validation split (seed 0) from {list(LRS)}: "
        + ", ".join(f"{label[key]} {value}" for key, value in lr.items()) + ".",
        "",
        "### Validation: learning rate (12 bits)",
        "",
        "| variant | lr | val MAP | localisation |",
        "|---|---|---|---|",
        *[f"| {label[key]} | {x} | {_f(r['map'])} | {_f(r['localisation'])} |"
          for (key, x), r in results["lr_records"].items()],
        "",
        "### Validation: norm (DSaH, 12 bits, each at its learning rate)",
        "",
        "| norm | " + " | ".join(f"seed {s}" for s in NORM_SEEDS) + " | mean |",
        "|---|" + "---|" * (len(NORM_SEEDS) + 1),
        *[f"| {norm} | " + " | ".join(_f(seeds[(norm, s)]["map"]) for s in NORM_SEEDS) + f" | {_f(mean[norm])} |"
          for norm in NORMS],
        "",
        "### synthetic-fg (MAP, query vs database)",
        "",
        *bits_header,
        *[row(label[key], key, "map") for key in (*NORMS, "dpsh")],
        *[row(f"{label[norm]}: hashing network on the original images (Hash(x))", norm, "map_hash_only")
          for norm in NORMS],
        "",
        "### synthetic-fg: saliency localisation after the last epoch (1.0 = none)",
        "",
        *bits_header,
        *[row(label[norm], norm, "localisation") for norm in NORMS],
        "",
        "### Runs",
        "",
        "| run | MAP | seconds |",
        "|---|---|---|",
        *[f"| {r['tag']} | {_f(r['map'])} | {r['seconds']:.0f} |" for r in results["records"]],
        "",
    ]
    return "\n".join(lines)


def with_section(text: str, heading: str, section: str, before: str) -> str:
    """`text` with the `## heading` section (up to the next `## `) replaced by `section`, or, where
    there is none, `section` inserted before the `before` heading (or appended)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == heading]
    if starts:
        end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "".join(lines[: starts[0]]) + section + "".join(lines[end:])
    at = next((i for i, line in enumerate(lines) if line.rstrip("\n") == before), len(lines))
    return "".join(lines[:at]) + section + "".join(lines[at:])


def _key(k: Any) -> str:
    return " / ".join(map(str, k)) if isinstance(k, tuple) else str(k)


def _tags(d: dict) -> dict[str, Any]:
    return {_key(k): v["tag"] for k, v in d.items()}


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": results["lr"],
        "tables": {name: _tags(results[name])
                   for name in ("lr_records", "margin", "main", "simultaneous", "ablation", "digits", "pretrained")},
        "runs": results["records"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="Tiny data and 2 epochs: checks the script, proves nothing.")
    parser.add_argument("--runs", type=Path, default=None,
                        help="Keep the run folders here (default: a deleted temp folder).")
    parser.add_argument("--only", choices=["semantic-norm"], default=None,
                        help="Run one added experiment and write it as a section into the existing results.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_threads(1)
    epochs = 2 if args.quick else args.epochs
    command = "python -m dsah_rt.bench.train_evidence " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsah-train-evidence-") as tmp:
        results = (run_semantic_norm if args.only else run_all)(args.runs or Path(tmp), epochs, args.quick)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    md, js = args.out / f"train-evidence{suffix}.md", args.out / f"train-evidence{suffix}.json"
    if args.only:
        section = report_semantic_norm(results, command, epochs, seconds)
        text = with_section(md.read_text() if md.exists() else "", NORM_HEADING, section + "\n", NOTES_HEADING)
        record = json.loads(js.read_text()) if js.exists() else {}
        record["semantic_norm"] = {
            "command": command, "seconds": seconds, "lr": results["lr"],
            "tables": {name: _tags(results[name]) for name in ("lr_records", "seeds", "main")},
            "runs": results["records"],
        }  # fmt: skip
    else:
        text = report(results, command, epochs, seconds)
        record = {"command": command, "seconds": seconds, **_jsonable(results)}
    atomic_write(md, lambda fh: fh.write(text.encode()))
    write_json(js, record)
    print(section if args.only else text)


if __name__ == "__main__":
    main()
