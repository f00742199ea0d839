"""builtin:shapes: a synthetic image set that needs no download (numpy + PIL only, no Ray).

Each image is a function of (seed, split, index) alone, so any subset renders on any worker and two
runs with the same seed see the same pixels. Shapes are drawn at SUPERSAMPLE times the final size and
box-filtered down, which gives the smooth edges that make reconstructions worth looking at even at
32x32. The label is the type of the largest shape, which is drawn last so it is never hidden.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ["circle", "square", "triangle", "star", "hexagon"]
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLE = 4  # draw at 4x, then box-downsample: antialiased edges for the price of a resize
MIN_CONTRAST = 120.0  # least Euclidean RGB distance between a shape and the background behind it

# Outline of each polygon shape on the unit circle (circle is drawn as an ellipse).
_STAR = [(r * math.cos(a), r * math.sin(a))
         for k in range(10) for r, a in [(1.0 if k % 2 == 0 else 0.45, math.pi * k / 5 - math.pi / 2)]]
_OUTLINES = {
    "square": [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4],
    "triangle": [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2],
    "star": _STAR,
    "hexagon": [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3],
}


def _polygon_area(points: list[tuple[float, float]]) -> float:
    xs, ys = np.array(points).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


# Area of each shape with circumradius 1: "largest" compares these areas, not radii.
UNIT_AREAS = {"circle": math.pi, **{name: _polygon_area(pts) for name, pts in _OUTLINES.items()}}


def render_shapes(
    seed: int, split: str, indices, image_size: int = 32, max_shapes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Render images `indices` of `split`: (uint8 N x H x W x 3, int64 labels N)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    images = np.empty((len(indices), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(indices), dtype=np.int64)
    for row, index in enumerate(indices):
        rng = np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])
        images[row], labels[row] = _render_one(rng, image_size, max(1, int(max_shapes)))
    return images, labels


def _render_one(rng: np.random.Generator, image_size: int, max_shapes: int) -> tuple[np.ndarray, int]:
    big = image_size * SUPERSAMPLE
    background = _background(rng, image_size)  # final-size colours: what the contrast check compares to
    # Nearest upsampling: after the final box downsample the background is exactly `background` again.
    canvas = Image.fromarray(background).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)

    count = int(rng.integers(1, max_shapes + 1))
    kinds = rng.integers(0, len(SHAPE_NAMES), size=count)
    # Sample areas, not radii, so every shape type is equally likely to be the largest (the label).
    areas = rng.uniform(0.04, 0.2, size=count) * big**2
    order = np.argsort(areas, kind="stable")  # smallest first, so the largest (the label) is on top
    for position, i in enumerate(order):
        name = SHAPE_NAMES[int(kinds[i])]
        radius = math.sqrt(areas[i] / UNIT_AREAS[name])
        # The labelled shape stays (almost) inside the frame; the others may be cut by the border.
        margin = min(radius * (0.9 if position == count - 1 else 0.3), big / 2)
        cx, cy = rng.uniform(margin, big - margin, size=2)
        colour = _contrasting_colour(rng, background[int(cy) // SUPERSAMPLE, int(cx) // SUPERSAMPLE])
        if name == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        else:
            angle = rng.uniform(0, 2 * math.pi)
            c, s = math.cos(angle), math.sin(angle)
            points = [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in _OUTLINES[name]]
            draw.polygon(points, fill=colour)
    small = canvas.reduce(SUPERSAMPLE)  # box filter: the antialiasing step
    return np.asarray(small), int(kinds[order[-1]])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A flat colour, or half the time a gentle two-colour linear gradient at a random angle."""
    first = rng.uniform(0, 255, size=3).astype(np.float32)
    if rng.random() < 0.5:
        return np.broadcast_to(first.astype(np.uint8), (size, size, 3))
    second = np.clip(first + rng.uniform(-60, 60, size=3).astype(np.float32), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = np.clip(ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle) + 0.5, 0, 1)
    return (first + t[..., None] * (second - first)).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background under the shape's centre to stay visible."""
    behind = behind.astype(np.float64)
    for _ in range(8):
        colour = rng.uniform(0, 255, size=3)
        if np.sum((colour - behind) ** 2) >= MIN_CONTRAST**2:
            return tuple(int(v) for v in colour)
    # Unlucky draws: take the opposite corner of the RGB cube from the background.
    return tuple(int(v) for v in np.where(behind < 128, 255, 0))
