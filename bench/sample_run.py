"""An untrained RUN_DIR that behaves like a trained one: the benchmarks' models and the tests' fixture.

DSaH on any backbone, written by the trainer's own save_checkpoint. Speed does not depend on the
weights, but the bit agreement of two backends does: a randomly initialised network gives every
image nearly the same u (one code for all), which would let a comparison that mixes up rows pass.
So the hash layer is standardised per bit over rendered scenes, as training would balance the
bits, and without pretrained weights the BN statistics are made non-trivial, as a trained
network's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsah_rt.export.verify import scene_images
from dsah_rt.train.methods import build_model
from dsah_rt.train.methods.dsah import MEASURED_FCN
from dsah_rt.train.run_dir import capture_rng_states, resolved_config, save_checkpoint

CALIBRATION_IMAGES = 64


def make_run(
    run_dir: Path, backbone: str, bits: int, input_size: int, weights: str = "none", seed: int = 0, fcn: str = MEASURED_FCN
) -> Path:
    """Write and return `run_dir`: DSaH on `backbone` at `input_size` px, `weights` as build_model takes them,
    with `dsah-rt train`'s default FCN unless `fcn` says otherwise."""
    torch.manual_seed(seed)
    model = build_model("dsah", backbone, bits, weights=weights, fcn=fcn)
    with torch.no_grad():
        # FCN starts its finer scores at zero; trained, they are not, and an export must carry them.
        for name in ("score_c4", "score_c3"):
            if hasattr(model.attention, name):
                torch.nn.init.normal_(getattr(model.attention, name).weight, std=0.1)
        if weights == "none":
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    _balance_bits(model, scene_images(CALIBRATION_IMAGES, input_size, seed=123))
    config = resolved_config(model, input_size, training={}, weights_source=model.config()["weights_source"])
    save_checkpoint(run_dir, model, {}, 0, config, capture_rng_states(), [])
    return run_dir


def _balance_bits(model: Any, images: np.ndarray) -> None:
    """u per bit to mean 0, std 1 over `images` (NCHW uint8), by rescaling the DSaH hash layer."""
    model.eval()
    with torch.no_grad():
        u = model.encode(torch.from_numpy(images).float() / 255)
        mean, std = u.mean(0), u.std(0)
        layer = model.hashing.hash_layer
        layer.weight.div_(std[:, None])
        layer.bias.sub_(mean).div_(std)
