"""Tiny training runs and their exports, shared by the runner, encode and export tests.

Exporting takes seconds, so each (bits, with_u) model is made once per session and cached.
The model is DSaH on the `small` backbone at 32 px, randomly initialised: the tests check that
every backend computes the same function, which needs no training.
"""

from __future__ import annotations

import functools
from pathlib import Path

INPUT_SIZE = 32
BITS = 12  # not a multiple of 8: the packing's zero padding is exercised everywhere


def make_run(run_dir: Path, bits: int = BITS, seed: int = 0, fcn: str = "8s") -> Path:
    """The tests' tiny RUN_DIR (see dsah_rt.bench.sample_run: BN statistics and bits spread like a trained run's)."""
    from dsah_rt.bench.sample_run import make_run as sample_run

    return sample_run(run_dir, "small", bits, INPUT_SIZE, seed=seed, fcn=fcn)


@functools.cache
def exported(workdir: Path, bits: int = BITS, with_u: bool = True) -> tuple[Path, Path]:
    """(run_dir, model.onnx) for a tiny run, exported and verified once per session.

    Pass the same `workdir` (e.g. tmp_path_factory.getbasetemp() / "models") from every module.
    """
    from dsah_rt.export.pipeline import export_run

    base = workdir / f"bits{bits}-u{int(with_u)}"
    run = make_run(base / "run", bits=bits)
    onnx_path = base / "model.onnx"
    export_run(run, onnx_path, with_u=with_u)
    return run, onnx_path
