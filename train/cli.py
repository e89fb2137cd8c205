"""`dsah-rt train` and `dsah-rt saliency`. torch and the training modules are imported inside the
commands, so `dsah-rt --help` does not pay for them."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from dsah_rt.errors import UserError

SHOWN_SKIPS = 20  # as many as `encode` prints; the Python API has them all in RetrievalData.skipped


def method_names() -> list[str]:
    """The registered methods, one file each in train/methods/, named without importing them (and torch)."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("dsah_rt.train.methods")
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(spec.submodule_search_locations))


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as JSON where it parses (numbers, true/false, null), else a string."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise UserError(f"--data-option {text!r}: expected key=value")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


@click.command("train")
@click.option("--data", required=True, help="Dataset name (synthetic-fg, digits, ...), folder, or name:folder.")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
              help="A dataset option, e.g. num_classes=5 (repeatable); for CIFAR-10, protocol=cifar10|cifar10-1|"
                   "cifar10-2 picks DeepHash-pytorch's splits (54,000 / 59,000 / 50,000-image databases).")
@click.option("--data-seed", type=int, default=0, show_default=True,
              help="Seed of the dataset's sampling or generation.")
@click.option("--bits", type=int, multiple=True, default=(12,), show_default=True,
              help="Code length; repeat for one sub-run per length (OUT/bits-K).")
@click.option("--method", type=click.Choice(method_names()), default="dsah", show_default=True,
              help="dsah (the paper), dpsh (the baseline), saliency-dpsh (DSaH's attention around DPSH's loss).")
@click.option("--recipe", type=click.Choice(["measured", "paper"]), default="measured", show_default=True,
              help="Where the options below that show no default take theirs: measured (chosen on validation "
                   "splits, README 'Training') or paper (Algorithm 1 as written; DPSH's eta 0.1).")
@click.option("--backbone", default="small", show_default=True, help="vgg16, efficientnet_lite0 or small.")
@click.option("--weights", default=None,
              help="imagenet, none or a state-dict path [default: imagenet, none for the small backbone].")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--mode", type=click.Choice(["iterative", "simultaneous"]), default="iterative", show_default=True,
              help="Algorithm 1, or both networks on Eq. 18 (Table 3).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="adam", show_default=True,
              help="adam: stable from a random init; sgd (momentum 0.9) is the paper's, and diverges at lr 0.01 there.")
@click.option("--lr", type=float, default=None, help="Learning rate per image [default: sgd 0.01, adam 3e-4].")
@click.option("--schedule", type=click.Choice(["none", "cosine", "step"]), default="cosine", show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--clip-grad", type=float, default=None,
              help="Clip each step's gradient (per image) to this l2 norm [default: no clipping].")
@click.option("--hash-backbone", type=click.Choice(["tune", "frozen"]), default="tune", show_default=True,
              help="Train the hashing network's backbone, or only its hash layer (the paper's reading of sec. 4.3: "
                   "VGG-16 'is not finetuned'; at 64 px it left every method at chance).")
@click.option("--warmup-epochs", type=int, default=None,
              help="DSaH: epochs training the hashing network alone on the original images before Algorithm 1 "
                   "[default: measured epochs/6, paper 0].")
@click.option("--warmup-liftoff", type=float, default=None,
              help="DSaH: go on warming up (to at most twice --warmup-epochs) until the warm-up's semantic loss is "
                   "this share below chance, i.e. the hashing network has lifted off [default: 0, a fixed warm-up].")
@click.option("--attention-wait", type=float, default=None,
              help="DSaH: after the warm-up, hold Algorithm 1's attention pass (the hashing pass training on the "
                   "original images) until the hashing network's semantic loss is this share below chance "
                   "[default: measured 0.02, paper 0 (no wait)].")
@click.option("--refit-epochs", type=int, default=None,
              help="DSaH: last epochs training the hashing network alone on the saliency images, the attention "
                   "frozen and the learning rate restarted [default: measured epochs/3, paper 0].")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Evaluate MAP and write the codes every N epochs (and always after the last).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--input-size", type=int, default=None, help="Square input side [default: the backbone's].")
@click.option("--lambda", "lam", type=float, default=None, help="Semantic weight [default: 30; 60 simultaneous].")
@click.option("--alpha", type=float, default=None,
              help="J_sal's weight [default: measured 0; paper 40, 0.01 simultaneous].")
@click.option("--eta", type=float, default=None, help="DPSH's quantization weight [default: measured 0.01, paper 0.1].")
@click.option("--margin", type=float, default=None, help="Saliency margin m [default: bits/4].")
@click.option("--margin-units", type=click.Choice(["bits", "unit"]), default="bits", show_default=True,
              help="Distances of Eq. 9 in bits (k|...|) or as written, in [0, 1].")
@click.option("--semantic-norm", type=click.Choice(["abs", "square", "likelihood"]), default=None,
              help="J_sem's pair error squared (the squared l2 loss), |S - (u.u+k)/2k| as Eq. 6 writes it, "
                   "or DPSH's pair likelihood in its place [default: measured likelihood, paper abs].")
@click.option("--fcn", type=click.Choice(["16s", "8s"]), default=None,
              help="DSaH: the attention network's finest score, FCN-16s (the paper's) or FCN-8s (a stride-8 grid) "
                   "[default: measured 8s, paper 16s].")
@click.option("--saliency-area", "area", type=float, default=None,
              help="Weight of the saliency map's mean area in Eq. 14, so the map pays for what it keeps "
                   "[default: measured 300, paper 0].")
@click.option("--ablation", "ablations", multiple=True,
              type=click.Choice(["hash-sal", "hash-no-ori", "attention-no-sem", "attention-no-sal", "no-quantization",
                                 "attention-identity"]),
              help="Table 4 switches (repeatable); hash-no-ori trains the hashing network on saliency images only; "
                   "attention-identity is the control Salmap = 1 (y = x) under the same losses and schedule.")
@click.option("--augment", type=click.Choice(["none", "crop", "crop+flip"]), default="none", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", "num_workers", type=int, default=0, show_default=True, help="Data loader processes.")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads [default: torch's]; 1 on a busy machine avoids threads spinning on each other.")
def train(data, data_options, data_seed, bits, out, resume, threads, **kwargs) -> None:
    """Train DSaH (Algorithm 1) or the DPSH baseline; checkpoint, metrics and codes go to --out."""
    from dsah_rt.omp import passive_openmp

    passive_openmp()  # before torch starts: spinning OpenMP threads slow training on shared cores (README)
    import torch

    from dsah_rt.encode import display_path
    from dsah_rt.train.data import load_dataset
    from dsah_rt.train.run_dir import sub_run_dir
    from dsah_rt.train.options import TrainOptions
    from dsah_rt.train.trainer import train as train_run

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    options = dict(parse_option(o) for o in data_options)
    bits = tuple(dict.fromkeys(bits))
    runs = [TrainOptions(data=data, data_options=options, data_seed=data_seed, bits=k, **kwargs) for k in bits]
    for opts in runs:  # every option checked before the data is loaded, so a bad one fails at once
        opts.resolved()
    dataset = load_dataset(data, seed=data_seed, **options)
    for skip in dataset.skipped[:SHOWN_SKIPS]:
        click.echo(f"skipped {display_path(skip.path)}: {skip.reason}", err=True)
    if len(dataset.skipped) > SHOWN_SKIPS:
        click.echo(f"... and {len(dataset.skipped) - SHOWN_SKIPS} more skipped files", err=True)
    for opts in runs:
        run_dir = sub_run_dir(out, opts.bits, bits)
        with _interrupt_keeps_last_epoch(run_dir):
            metrics = train_run(opts, run_dir, data=dataset, resume=resume, echo=lambda line: click.echo(line, err=True))
        click.echo(f"{run_dir}: {opts.bits} bits, {len(metrics)} epochs, MAP {metrics[-1]['map']:.4f}")


@contextmanager
def _interrupt_keeps_last_epoch(run_dir: Path) -> Iterator[None]:
    """Ctrl-C and SIGTERM (a scheduler's kill) end a run the same way: every finished epoch is
    already checkpointed atomically, so say how to continue instead of printing a traceback."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        from dsah_rt.train.run_dir import CHECKPOINT

        kept = "its last finished epoch is saved: add --resume to continue" if (Path(run_dir) / CHECKPOINT).exists() \
            else "no epoch had finished, so nothing was written"
        raise UserError(f"{run_dir}: interrupted; {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("saliency")
@click.argument("images", type=click.Path(exists=True))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="A DSaH run folder.")
@click.option("--bits", type=int, default=None, help="Which sub-run, for a run trained with several --bits.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--device", default="auto", show_default=True)
def saliency(images, run_dir, bits, out, device) -> None:
    """Write IMAGES (a file or a folder) with their saliency map (image | overlay | saliency image) as PNGs."""
    from dsah_rt.train.saliency_viz import render_saliency

    written, skipped = render_saliency(Path(images), run_dir, Path(out), bits=bits, device=device,
                                       echo=lambda line: click.echo(line, err=True))
    click.echo(f"{written} saliency images -> {out}" + (f" ({skipped} skipped)" if skipped else ""))
