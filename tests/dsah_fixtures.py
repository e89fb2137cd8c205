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


def make_run(run_dir: Path, bits: int = BITS, size: int = INPUT_SIZE, seed: int = 0) -> Path:
    """A RUN_DIR written by the trainer's own save_checkpoint."""
    import torch

    from dsah_rt.train.methods import build_model
    from dsah_rt.train.run import capture_rng_states, resolved_config, save_checkpoint

    torch.manual_seed(seed)
    model = build_model("dsah", "small", bits, weights="none")
    # A trained network's BN statistics are not the identity; random ones make the test harder.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    _balance_bits(model, size)
    config = resolved_config(model, size, training={}, weights_source="none (random init)")
    save_checkpoint(run_dir, model, {}, 0, config, capture_rng_states(), [])
    return run_dir


def _balance_bits(model, size: int) -> None:  # noqa: ANN001 - a DSaH module
    """Standardise u per bit over calibration scenes, as training would balance the bits.

    A randomly initialised network gives every image nearly the same u (one code for all), which
    would let a test that mixes up rows pass; after this, codes differ from image to image.
    """
    import torch

    from dsah_rt.export.verify import scene_images

    model.eval()
    with torch.no_grad():
        u = model.encode(torch.from_numpy(scene_images(64, size, seed=123)).float() / 255)
        mean, std = u.mean(0), u.std(0)
        layer = model.hashing.hash_layer
        layer.weight.div_(std[:, None])
        layer.bias.sub_(mean).div_(std)


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
