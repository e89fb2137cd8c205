"""Saliency pictures like the paper's Figure 7: image | heat-map overlay | saliency image y (Eq. 4).

The map is computed at the run's input size and drawn at the image's own size (bilinear), so the
panels show the photo as it is. Pillow and numpy only (matplotlib is a dev extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsah_rt.atomic import atomic_write
from dsah_rt.errors import DataError, UserError
from dsah_rt.train.data.core import IMAGE_EXTENSIONS, read_image
from dsah_rt.train.models import DSaH
from dsah_rt.train.run import load_run
from dsah_rt.train.trainer import resolve_device

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
    """Eq. 3's map for one HxWx3 uint8 image, computed at `input_size` and resized to H x W."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255).to(device)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    salmap, _ = model.saliency(x.clamp(0, 1))
    salmap = F.interpolate(salmap, size=image.shape[:2], mode="bilinear", align_corners=False)
    return salmap[0, 0].clamp(0, 1).cpu().numpy()


def _image_files(images: Path) -> list[Path]:
    if images.is_file():
        return [images]
    return sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def render_saliency(
    images: Path,
    run_dir: str | Path,
    out: Path,
    bits: int | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> tuple[int, int]:
    """Write `out/<stem>.png` for an image file or each image in a folder; return (written, skipped).

    An unreadable file given on its own is an error; in a folder it is skipped with a message.
    """
    dev = resolve_device(device)
    model, config = load_run(run_dir, device=dev, bits=bits)
    if not isinstance(model, DSaH):
        raise UserError(f"{run_dir}: a {config['method']} run has no attention network; saliency needs a DSaH run")
    files = _image_files(images)
    if not files:
        raise UserError(f"{images}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for path in files:
        try:
            image = read_image(path)
        except DataError as exc:
            if images.is_file():
                raise
            echo(f"skipped {exc}")
            skipped += 1
            continue
        figure = saliency_figure(image, saliency_map(model, image, config["input_size"], dev))
        _save_png(out / f"{path.stem}.png", figure)
        written += 1
    return written, skipped


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda fh: Image.fromarray(pixels).save(fh, format="PNG"))
