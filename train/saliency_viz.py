"""Saliency pictures like the paper's Figure 7: image | heat-map overlay | saliency image y (Eq. 4).

The map is computed on the image as training and `encode` feed it to the model
(`dsah_rt.images.decode` and `resize`), and drawn at the image's own size (bilinear), so the
panels show the photo as it is. A folder is read as `encode` reads it: recursively, images told
by content, every other file reported with its reason. Pillow and numpy only (matplotlib is a
dev extra).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsah_rt.atomic import atomic_write
from dsah_rt.encode import first_skips
from dsah_rt.errors import DataError, UserError, display_path
from dsah_rt.images import ImageSkip, Skip, decode, resize, scan
from dsah_rt.train.methods import get_method
from dsah_rt.train.models import DSaH
from dsah_rt.train.options import resolve_device
from dsah_rt.train.run_dir import load_run

# Anchors of a jet-like colormap (blue -> cyan -> yellow -> red), evenly spaced on [0, 1].
_COLORMAP = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
)
OVERLAY_ALPHA = 0.5
MIN_SIDE = 128  # tiny images (8x8 digits) are enlarged, nearest neighbour, to at least this
GAP = 4


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 1]."""
    anchors = np.linspace(0, 1, len(_COLORMAP))
    v = np.clip(values, 0, 1)
    return np.stack([np.interp(v, anchors, _COLORMAP[:, c]) for c in range(3)], axis=-1)


def saliency_figure(image: np.ndarray, salmap: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) map in [0, 1] -> the three panels side by side, uint8."""
    scale = max(1, -(-MIN_SIDE // min(image.shape[:2])))
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
        salmap = salmap.repeat(scale, 0).repeat(scale, 1)
    rgb = image.astype(np.float32) / 255
    overlay = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colormap(salmap)
    masked = rgb * salmap[..., None]
    gap = np.ones((rgb.shape[0], GAP, 3), dtype=np.float32)
    panels = np.concatenate([rgb, gap, overlay, gap, masked], axis=1)
    return np.round(np.clip(panels, 0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def saliency_map(model: DSaH, image: np.ndarray, input_size: int, device: torch.device) -> np.ndarray:
    """Eq. 3's map for one HxWx3 uint8 image, computed on its model input and resized to H x W."""
    pixels = resize(image, input_size)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(255).to(device)
    salmap, _ = model.saliency(x)
    salmap = F.interpolate(salmap, size=image.shape[:2], mode="bilinear", align_corners=False)
    return salmap[0, 0].clamp(0, 1).cpu().numpy()


def render_saliency(
    images: Path,
    run_dir: str | Path,
    out: Path,
    bits: int | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> tuple[int, int]:
    """Write `out/<relative path>.png` for an image file or each image under a folder; return
    (written, skipped).

    The whole relative name is kept (`a.jpg` -> `a.jpg.png`, `sub/a.jpg` -> `sub/a.jpg.png`) so
    that `a.jpg` and `a.png`, or two folders' `0.jpg`, never overwrite each other. An unreadable
    file given on its own is an error; in a folder it is skipped with its reason, and so is
    every file that is not an image. `out` inside the folder is left out of the scan, so a rerun
    does not draw its own pictures.
    """
    dev = resolve_device(device)
    model, config = load_run(run_dir, device=dev, bits=bits)
    if not get_method(config["method"]).has_attention:
        raise UserError(f"{run_dir}: a {config['method']} run has no attention network; saliency needs a DSaH run")
    if images.is_file():
        root, files, skipped = images.parent, [images.name], []
    else:
        found = scan(images, _own_output(images, out))
        root, files, skipped = found.root, found.files, found.skipped
    for skip in skipped:
        echo(f"skipped {display_path(skip.path)}: {skip.reason}")
    written, reasons = 0, [(s.path, s.reason) for s in skipped]
    for rel in files:
        try:
            image = decode(root / rel)
        except ImageSkip as exc:
            if images.is_file():
                raise DataError(f"{images}: cannot read image ({exc})") from None
            echo(f"skipped {display_path(rel)}: {exc}")
            reasons.append((rel, str(exc)))
            continue
        figure = saliency_figure(image, saliency_map(model, image, config["input_size"], dev))
        target = out / f"{rel}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_png(target, figure)
        written += 1
    if not written:
        shown = first_skips([Skip(rel, reason) for rel, reason in reasons])
        raise UserError(f"{images}: no images found" + (f" (skipped {shown})" if reasons else ""))
    return written, len(reasons)


def _own_output(folder: Path, out: Path) -> frozenset[str]:
    """`out` relative to `folder` when it lies inside it (to leave out of the scan), else nothing."""
    inside = os.path.relpath(out.resolve(), folder.resolve())
    return frozenset() if inside == os.pardir or inside.startswith(os.pardir + os.sep) else frozenset({inside})


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda fh: Image.fromarray(pixels).save(fh, format="PNG"))
