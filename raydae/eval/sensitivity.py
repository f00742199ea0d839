"""Does a feature space see damage? Fréchet distances from real images to blurred, noisy and scrambled ones.

A yardstick that puts blurred or scrambled images as close to the real ones as other real images are
measures nothing. `feature_sensitivity` splits a set of real images in two halves, degrades the second
half at increasing levels and reports each level's Fréchet distance to the first half beside the
real-vs-real floor (both halves clean): a useful space gives distances that grow from the floor with
every level (`monotone`).

Plain PyTorch + numpy; deterministic for a seed (local generators only).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydae.eval.distances import frechet_distance
from raydae.pixels import model_input
from raydae.seeds import derive_seed

# Levels in order of increasing damage: Gaussian blur sigma (pixels), additive Gaussian noise sigma (a
# fraction of the pixel range, so 0.1 is about 25 grey levels), and patch shuffling on a g×g grid of tiles
# (finer grids scramble more of the image's structure).
DEGRADATIONS: dict[str, tuple[float, ...]] = {
    "blur": (0.5, 1.0, 2.0),
    "noise": (0.05, 0.1, 0.2),
    "shuffle": (2, 4, 8),
}


# ----------------------------------------------------------------------------------- degradations
def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of `(N, C, H, W)` images (kernel radius 3 sigma, reflected borders)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    # Reflection needs a border smaller than the image; tiny images fall back to replicated edges.
    mode = "reflect" if radius < min(images.shape[-2:]) else "replicate"
    out = F.pad(images, (radius, radius, 0, 0), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode=mode)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def add_noise(images: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise of std `sigma` × the pixel range on images in [-1, 1], clipped back to the range."""
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    return (images + 2.0 * sigma * noise).clamp(-1, 1)


def shuffle_patches(images: Tensor, grid: int, generator: torch.Generator) -> Tensor:
    """Cut each image into `grid`×`grid` tiles and put them back in a random order (one order per image).

    Rows and columns beyond the last whole tile (when the size is not a multiple of `grid`) stay put.
    """
    n, c, h, w = images.shape
    tile_h, tile_w = h // grid, w // grid
    if tile_h == 0 or tile_w == 0:
        raise ValueError(f"a {grid}x{grid} grid does not fit {h}x{w} images")
    h, w = grid * tile_h, grid * tile_w
    tiles = images[:, :, :h, :w].reshape(n, c, grid, tile_h, grid, tile_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, tile_h, tile_w)  # (N, tiles, C, th, tw)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(n)]).to(images.device)
    tiles = tiles[torch.arange(n, device=images.device)[:, None], order]
    out = images.clone()
    out[:, :, :h, :w] = tiles.reshape(n, grid, grid, c, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    return out


def degrade(images: Tensor, kind: str, level: float, generator: torch.Generator) -> Tensor:
    """One degradation of `DEGRADATIONS` at one level, on images in [-1, 1]."""
    if kind == "blur":
        return gaussian_blur(images, level)
    if kind == "noise":
        return add_noise(images, level, generator)
    if kind == "shuffle":
        return shuffle_patches(images, int(level), generator)
    raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")


# ------------------------------------------------------------------------------------ the check
def _embed_all(embed: Callable, images: Tensor, batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in images.split(batch_size):
        out = embed(batch)
        for key, value in (out.items() if isinstance(out, dict) else [("", out)]):  # one plain array: key ""
            parts.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(value) for key, value in parts.items()}


def feature_sensitivity(embed: Callable, images: Tensor, seed: int = 0,
                        degradations: dict[str, tuple[float, ...]] = DEGRADATIONS, batch_size: int = 250) -> dict:
    """Fréchet distance from real images (first half) to the second half degraded at each level.

    `embed` maps a batch of `(B, 3, H, W)` images in [-1, 1] to `(B, D)` features, or to `{space: (B, D)}`
    for several feature spaces at once (then the answer is `{space: report}`). `images` are uint8 or
    floats in [-1, 1]. A report reads

        {"num_images": 500,                      # per half
         "floor": 0.26,                          # real vs real: both halves clean
         "blur": {"levels": [0.5, 1.0, 2.0], "fd": [...], "monotone": true},
         "noise": {...}, "shuffle": {...},
         "monotone": true}                       # every degradation monotone

    where a degradation is `monotone` when its distances rise strictly from the floor level by level.
    """
    images = model_input(images).float()
    half = images.shape[0] // 2
    if half < 2:
        raise ValueError(f"need at least 4 images (2 per half for a covariance), got {images.shape[0]}")
    reference, probe = images[:half], images[half : 2 * half]
    real = _embed_all(embed, reference, batch_size)
    clean = _embed_all(embed, probe, batch_size)
    reports = {key: {"num_images": half, "floor": frechet_distance(real[key], clean[key])} for key in real}
    for index, (kind, levels) in enumerate(degradations.items()):
        generator = torch.Generator().manual_seed(derive_seed(seed, index, stride=1000))  # one stream per degradation
        distances: dict[str, list[float]] = {key: [] for key in real}
        for level in levels:
            degraded = _embed_all(embed, degrade(probe, kind, level, generator), batch_size)
            for key in real:
                distances[key].append(frechet_distance(real[key], degraded[key]))
        for key, report in reports.items():
            chain = [report["floor"], *distances[key]]
            report[kind] = {"levels": list(levels), "fd": distances[key],
                            "monotone": all(a < b for a, b in zip(chain, chain[1:]))}
    for report in reports.values():
        report["monotone"] = all(report[kind]["monotone"] for kind in degradations)
    return reports if set(reports) != {""} else reports[""]
