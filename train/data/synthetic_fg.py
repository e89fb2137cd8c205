"""synthetic-fg: a generated fine-grained set whose classes differ only in one small part.

Every image shows the same kind of object, a bird-like composite (body, head, eye, beak, tail,
legs) whose colours are jittered the same way for every class, at a random position, scale and
facing, on clutter: smooth colour noise, pixel grain and random ellipses and rectangles. The
class is written only in a square "wing patch" on the body, as a 3x3 glyph of dots; the patch
covers about 3.6-7.8% of the image and its box is `Split.boxes`. Decoys (patches carrying a
random class's glyph, up to `decoys` of them in the background) make the glyph alone not
enough: the model has to find the one on the object.

`render(latents, labels)` is a pure function, and nothing outside the patch depends on the
label, so the class signal provably lives inside the box. Glyphs are left-right symmetric, so
a horizontal flip keeps every image's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from dsah_rt.errors import DataError

from .core import RetrievalData, Split
from .registry import register_dataset

# Defaults sized for a training run of a few minutes on two CPU cores.
NUM_CLASSES = 10
IMAGE_SIZE = 64
TRAIN_PER_CLASS = 100
QUERY_PER_CLASS = 30
# Without decoys a plain global-pooling CNN reads the glyph wherever it is; with two it has to tie
# the glyph to the object, which it still learns (train-evidence.md has the figures).
DECOYS = 2

GRID = 3  # glyph cells per side
_SCALE = (0.19, 0.28)  # object scale (and patch side), as a fraction of the image side
_PATCH_CENTRE = (-0.12, 0.0)  # in object units, x towards the head
_BORDER = 0.08  # patch margin around the glyph grid, in patch sides
_DOT = 0.75  # dot side, in glyph cells
_DISTRACTORS = 6
# Pixels rendered at once: the painting is memory-bound, so chunks sized for the cache (float32
# buffers of ~3 MB) render faster than larger ones.
_CHUNK_PIXELS = 64 * 64 * 64


def class_glyphs(num_classes: int) -> np.ndarray:
    """(num_classes, 9) 0/1 glyphs, row-major 3x3, the same for every seed.

    Only left-right symmetric glyphs (left column = right column), so that flipping an image
    keeps its class; the first 12 classes all have five dots, so the patch's mean colour says
    nothing about the class.
    """
    codes = []
    for left, middle in product(product((0, 1), repeat=GRID), repeat=2):
        glyph = np.array([[a, b, a] for a, b in zip(left, middle)], dtype=np.uint8).ravel()
        if glyph.any():
            codes.append(glyph)
    weight = lambda g: int(g.sum())
    codes.sort(key=lambda g: (abs(2 * weight(g) - 9), -weight(g), tuple(g)))
    if not 2 <= num_classes <= len(codes):
        raise DataError(f"synthetic-fg: num_classes must be 2..{len(codes)}, got {num_classes!r}")
    return np.stack(codes[:num_classes])


@dataclass
class Latents:
    """Everything about a batch of images except their classes. Lengths in pixels, colours in [0, 1]."""

    image_size: int
    bg_colour: np.ndarray  # (n, 3)
    bg_field: np.ndarray  # (n, 3, 5, 5) low-frequency colour noise
    grain: np.ndarray  # (n, S, S) per-pixel noise, the same in every channel
    shape_box: np.ndarray  # (n, K) rectangle (else ellipse)
    shape_on: np.ndarray  # (n, K)
    shape_centre: np.ndarray  # (n, K, 2)
    shape_half: np.ndarray  # (n, K, 2)
    shape_colour: np.ndarray  # (n, K, 3)
    decoy_on: np.ndarray  # (n, D)
    decoy_centre: np.ndarray  # (n, D, 2)
    decoy_side: np.ndarray  # (n, D)
    decoy_class: np.ndarray  # (n, D)
    decoy_colours: np.ndarray  # (n, D, 2, 3) patch, ink
    centre: np.ndarray  # (n, 2) object centre
    scale: np.ndarray  # (n,) object unit = patch side
    facing: np.ndarray  # (n,) +1 head to the right, -1 to the left
    colours: np.ndarray  # (n, 7, 3) body, head, tail, beak, legs, patch, ink

    def __len__(self) -> int:
        return len(self.scale)

    def part_boxes(self) -> np.ndarray:
        """(n, 4) (x0, y0, x1, y1) of each object's patch: the discriminative part."""
        cx, cy = self.point(*_PATCH_CENTRE)
        half = self.scale / 2
        return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)

    def point(self, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates of the point (x, y) in object units."""
        return self.centre[:, 0] + self.facing * x * self.scale, self.centre[:, 1] + y * self.scale


def sample_latents(
    rng: np.random.Generator, n: int, image_size: int, num_classes: int, decoys: int = DECOYS
) -> Latents:
    """Latent parameters of `n` images, drawn with no regard to class."""
    s = image_size
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, (n, *shape)).astype(np.float32)
    scale = u(*_SCALE) * s
    # The object spans x in [-1.6, 1.6] and y in [-1.0, 1.05] object units: keep it all in view.
    centre = np.stack(
        [rng.uniform(1.6 * scale, s - 1.6 * scale), rng.uniform(1.0 * scale, s - 1.05 * scale)], axis=1
    ).astype(np.float32)
    body = u(0.25, 0.85, 3)
    colours = np.stack([
        body,
        np.clip(body + rng.normal(0, 0.08, (n, 3)), 0, 1),  # head
        body * 0.75,  # tail
        np.stack([u(0.6, 0.95), u(0.35, 0.65), u(0.0, 0.2)], axis=1),  # beak
        u(0.1, 0.3, 1).repeat(3, axis=1),  # legs
        u(0.7, 0.95, 3),  # patch
        u(0.0, 0.3, 3),  # ink
    ], axis=1).astype(np.float32)
    return Latents(
        image_size=s,
        bg_colour=u(0.15, 0.85, 3),
        bg_field=rng.normal(0, 0.18, (n, 3, 5, 5)).astype(np.float32),
        grain=rng.normal(0, 0.035, (n, s, s)).astype(np.float32),
        shape_box=rng.random((n, _DISTRACTORS)) < 0.5,
        shape_on=rng.random((n, _DISTRACTORS)) < 0.7,
        shape_centre=u(0, s, _DISTRACTORS, 2),
        shape_half=u(0.03 * s, 0.15 * s, _DISTRACTORS, 2),
        shape_colour=u(0, 1, _DISTRACTORS, 3),
        decoy_on=rng.random((n, decoys)) < 0.75,
        decoy_centre=u(0.1 * s, 0.9 * s, decoys, 2),
        decoy_side=u(*_SCALE, decoys) * s,
        decoy_class=rng.integers(0, num_classes, (n, decoys)),
        decoy_colours=np.stack([u(0.7, 0.95, decoys, 3), u(0.0, 0.3, decoys, 3)], axis=2),
        centre=centre,
        scale=scale,
        facing=np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32),
        colours=colours,
    )


def render(latents: Latents, labels: np.ndarray, glyphs: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 images of `latents` with the class glyphs `glyphs[labels]`."""
    s, lat = latents.image_size, latents
    # Channels first while painting: numpy broadcasts over a trailing axis of 3 slowly.
    img = lat.bg_colour[:, :, None, None] + _upsample(lat.bg_field, s) + lat.grain[:, None]
    for k in range(lat.shape_on.shape[1]):
        cx, cy = lat.shape_centre[:, k, 0], lat.shape_centre[:, k, 1]
        hx, hy = lat.shape_half[:, k, 0], lat.shape_half[:, k, 1]
        alpha = np.where(
            lat.shape_box[:, k, None, None], _rect(s, cx, cy, hx, hy), _ellipse(s, cx, cy, hx, hy)
        ) * lat.shape_on[:, k, None, None]
        _paint(img, alpha, lat.shape_colour[:, k])
    for k in range(lat.decoy_on.shape[1]):
        _draw_patch(img, lat.decoy_centre[:, k, 0], lat.decoy_centre[:, k, 1], lat.decoy_side[:, k],
                    glyphs[lat.decoy_class[:, k]], lat.decoy_colours[:, k], lat.decoy_on[:, k])
    unit, f = lat.scale, lat.facing
    body, head, tail, beak, dark, patch, ink = (lat.colours[:, i] for i in range(7))
    _paint(img, _ellipse(s, *lat.point(-1.15, -0.15), 0.45 * unit, 0.17 * unit, -0.4 * f), tail)
    legs = [_rect(s, *lat.point(x, 0.8), 0.07 * unit, 0.25 * unit) for x in (-0.3, 0.3)]
    _paint(img, np.maximum(*legs), dark)
    _paint(img, _ellipse(s, *lat.centre.T, 1.0 * unit, 0.72 * unit), body)
    _paint(img, _ellipse(s, *lat.point(0.95, -0.55), 0.42 * unit, 0.42 * unit), head)
    _paint(img, _ellipse(s, *lat.point(1.4, -0.5), 0.22 * unit, 0.09 * unit), beak)
    _paint(img, _ellipse(s, *lat.point(1.05, -0.62), 0.08 * unit, 0.08 * unit), dark)  # eye
    _draw_patch(img, *lat.point(*_PATCH_CENTRE), unit, glyphs[labels],
                np.stack([patch, ink], axis=1), np.ones(len(lat), dtype=bool))
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, shaped to broadcast against (n, S, S)."""
    c = np.arange(s, dtype=np.float32) + 0.5
    return c[None, None, :], c[None, :, None]


def _ellipse(s: int, cx, cy, ax, ay, angle=None) -> np.ndarray:
    """(n, S, S) coverage of axis-aligned (or `angle`-rotated) ellipses, edges anti-aliased."""
    x, y = _grid(s)
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    if angle is not None:
        c, si = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        dx, dy = c * dx + si * dy, -si * dx + c * dy
    ax, ay = ax[:, None, None], ay[:, None, None]
    radial = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    return np.clip(0.5 - (radial - 1) * np.minimum(ax, ay), 0, 1)


def _rect(s: int, cx, cy, hx, hy) -> np.ndarray:
    x, y = _grid(s)
    outside = np.maximum(np.abs(x - cx[:, None, None]) - hx[:, None, None],
                         np.abs(y - cy[:, None, None]) - hy[:, None, None])
    return np.clip(0.5 - outside, 0, 1)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Composite `colour` (n, 3) over channels-first `img` (n, 3, S, S) with coverage `alpha`."""
    ink = colour[:, :, None, None] - img
    ink *= alpha[:, None]
    img += ink


def _draw_patch(img, cx, cy, side, glyph, colours, on) -> None:
    """Light square patches with dark glyph dots; the dots never reach a pixel whose centre
    lies outside the square, which is what confines the class to the box."""
    s = img.shape[-1]
    x, y = _grid(s)
    on = on[:, None, None]
    half = side / 2
    _paint(img, _rect(s, cx, cy, half, half) * on, colours[:, 0])
    cell = side * (1 - 2 * _BORDER) / GRID
    x0, y0 = cx - half, cy - half
    gx, gy = (x0 + _BORDER * side)[:, None, None], (y0 + _BORDER * side)[:, None, None]
    cell3 = cell[:, None, None]
    col = np.clip(np.floor((x - gx) / cell3), 0, GRID - 1).astype(np.int64)
    row = np.clip(np.floor((y - gy) / cell3), 0, GRID - 1).astype(np.int64)
    bit = glyph[np.arange(len(glyph))[:, None, None], row * GRID + col]
    half_dot = _DOT * cell3 / 2
    cover_x = np.clip(half_dot - np.abs(x - (gx + (col + 0.5) * cell3)) + 0.5, 0, 1)
    cover_y = np.clip(half_dot - np.abs(y - (gy + (row + 0.5) * cell3)) + 0.5, 0, 1)
    inside = ((x >= x0[:, None, None]) & (x < (x0 + side)[:, None, None])
              & (y >= y0[:, None, None]) & (y < (y0 + side)[:, None, None]))
    _paint(img, cover_x * cover_y * bit * inside * on, colours[:, 1])


def _upsample(field: np.ndarray, s: int) -> np.ndarray:
    """Bilinear upsampling of (n, c, g, g) to (n, c, s, s), as two matrix products."""
    g = field.shape[-1]
    t = np.clip((np.arange(s) + 0.5) / s * g - 0.5, 0, g - 1)
    i0 = np.minimum(np.floor(t).astype(int), g - 2)
    w = (t - i0).astype(np.float32)
    m = np.zeros((s, g), dtype=np.float32)
    m[np.arange(s), i0] = 1 - w
    m[np.arange(s), i0 + 1] = w
    return m @ field @ m.T


def generate(
    rng: np.random.Generator, labels: np.ndarray, image_size: int, glyphs: np.ndarray, decoys: int = DECOYS
) -> Split:
    """Images of classes `labels`, with their part boxes."""
    images, boxes = [], []
    step = max(1, _CHUNK_PIXELS // image_size**2)
    for start in range(0, len(labels), step):
        chunk = labels[start : start + step]
        latents = sample_latents(rng, len(chunk), image_size, len(glyphs), decoys)
        images.append(render(latents, chunk, glyphs))
        boxes.append(latents.part_boxes())
    return Split(labels=labels, images=np.concatenate(images), boxes=np.concatenate(boxes).astype(np.float32))


@register_dataset("synthetic-fg", aliases=("synthetic",))
def load_synthetic_fg(
    *,
    seed: int,
    num_classes: int = NUM_CLASSES,
    image_size: int = IMAGE_SIZE,
    train_per_class: int = TRAIN_PER_CLASS,
    query_per_class: int = QUERY_PER_CLASS,
    database_per_class: int | None = None,
    decoys: int = DECOYS,
) -> RetrievalData:
    """Train and query sets of balanced classes (labels cycle 0, 1, ..., C-1, 0, ...). The
    database is the train set (the paper's fine-grained protocol) unless `database_per_class`
    asks for separate database images. Each split has its own random stream, so changing one
    split's size leaves the others' images unchanged."""
    counts = (("image_size", image_size, 32), ("train_per_class", train_per_class, 1),
              ("query_per_class", query_per_class, 1), ("decoys", decoys, 0),
              ("database_per_class", 1 if database_per_class is None else database_per_class, 1))
    for name, value, low in counts:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"synthetic-fg: {name} must be a whole number >= {low}, got {value!r}")
    glyphs = class_glyphs(num_classes)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]

    def split(stream: np.random.Generator, per_class: int) -> Split:
        labels = np.tile(np.arange(num_classes, dtype=np.int64), per_class)
        return generate(stream, labels, image_size, glyphs, decoys)

    train = split(streams[0], train_per_class)
    query = split(streams[1], query_per_class)
    database = train if database_per_class is None else split(streams[2], database_per_class)
    names = [f"class_{c:0{len(str(num_classes - 1))}d}" for c in range(num_classes)]
    return RetrievalData("synthetic-fg", train, query, database, num_classes, False, names)

