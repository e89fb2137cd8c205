"""How much an attention network could gain here: DPSH on the original images against DPSH on
saliency images made from the *true* part box (y = mask * x, mask 1 inside the box grown by
`--grow` pixels, 0 elsewhere), on synthetic-fg, same seeds, budget and matched initialisation.

    python -m dsah_rt.bench.attention_headroom --seeds 0 1 --epochs 20 --json bench/results/attention-headroom.json

The oracle map is the best any learned map can do under Eq. 4, so the gap between the two rows
bounds what DSaH's attention can add in a regime; a regime where the gap is small cannot show
DSaH ahead, however the attention is trained. MAP is the mean of the last 3 epochs.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from dsah_rt.omp import passive_openmp


def oracle_split(split, grow: float):
    """`split` with every pixel outside its (grown) part box set to black."""
    from dsah_rt.train.data import Split

    images = split.images.copy()
    rows, cols = np.mgrid[0 : images.shape[1], 0 : images.shape[2]] + 0.5
    for image, (x0, y0, x1, y1) in zip(images, split.boxes):
        keep = (cols >= x0 - grow) & (cols <= x1 + grow) & (rows >= y0 - grow) & (rows <= y1 + grow)
        image[~keep] = 0
    return Split(labels=split.labels, images=images, boxes=split.boxes)


def headroom(seeds: list[int], epochs: int, bits: int, grow: float, data_options: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dsah_rt.native import set_threads
    from dsah_rt.train.data import RetrievalData, load_dataset
    from dsah_rt.train.options import TrainOptions
    from dsah_rt.train.trainer import train

    torch.set_num_threads(1)
    set_threads(1)
    data = load_dataset("synthetic-fg", seed=0, **data_options)
    train_y = oracle_split(data.train, grow)
    masked = RetrievalData("synthetic-fg-oracle", train_y, oracle_split(data.query, grow), train_y,
                           data.num_classes, False)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, dataset in (("DPSH on x", data), ("DPSH on the oracle saliency image", masked)):
            for seed in seeds:
                opts = TrainOptions(method="dpsh", backbone="small", bits=bits, epochs=epochs, seed=seed, device="cpu")
                run_dir = Path(scratch) / f"{len(rows)}"
                metrics = train(opts, run_dir, data=dataset, echo=lambda line: None, progress=io.StringIO())
                maps = [m["map"] for m in metrics if "map" in m]
                rows.append({"input": name, "seed": seed, "map_last3": float(np.mean(maps[-3:])), "maps": maps})
                click.echo(f"{name}, seed {seed}: MAP {rows[-1]['map_last3']:.4f}", err=True)
    return {"bits": bits, "epochs": epochs, "grow": grow, "data_options": data_options, "rows": rows}


@click.command()
@click.option("--seeds", type=int, multiple=True, default=(0, 1), show_default=True)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--bits", type=int, default=12, show_default=True)
@click.option("--grow", type=float, default=2.0, show_default=True, help="Pixels kept around the part box.")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
              help="A synthetic-fg option, e.g. decoys=6 (repeatable): check another regime's headroom.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(seeds: tuple[int, ...], epochs: int, bits: int, grow: float, data_options: tuple[str, ...],
         json_out: str | None) -> None:  # fmt: skip
    passive_openmp()
    from dsah_rt.atomic import write_json
    from dsah_rt.train.cli import parse_option

    result = headroom(list(seeds), epochs, bits, grow, dict(parse_option(o) for o in data_options))
    for row in result["rows"]:
        click.echo(f"| {row['input']} | {row['seed']} | {row['map_last3']:.4f} |")
    if json_out:
        write_json(Path(json_out), result)


if __name__ == "__main__":
    main()
