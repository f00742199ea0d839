"""Draw samples from a finished run's generator and write them as PNGs (`raydae sample`; no Ray cluster needed).

The generator checkpoint holds everything: its config, the generator (EMA weights for DiT), the frozen
final decoder (and VQ codebook) and the task options (latent shape, classes, latent scale); it is read
through `checkpoints.load_generator`.
"""

from __future__ import annotations

import io
import math
import os

import torch
from PIL import Image

from raydae.checkpoints import load_generator
from raydae.errors import UserError
from raydae.pixels import pil_arrays, unit_to_uint8
from raydae.storage import RunFolder
from raydae.tasks import make_grid


def generator_checkpoint(run_dir: str) -> str:
    run = RunFolder.from_path(run_dir)
    if not run.exists():
        raise UserError(f"{run_dir}: no such run folder")
    if not run.exists("generator.done.json"):
        raise UserError(f"{run_dir}: has no finished generator (config generator: none, or the run is unfinished)")
    return run.read_json("generator.done.json")["checkpoint"]


def save_grid(images: torch.Tensor, path: str | None, nrow: int | None = None, pad: int = 2) -> bytes:
    """Tile images into one PNG (white gaps); writes it to `path` when given, returns the bytes."""
    grid = make_grid(images, nrow=nrow or math.ceil(math.sqrt(len(images))), pad=pad)  # CHW in [0, 1]
    canvas = unit_to_uint8(grid).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    if path:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    return buffer.getvalue()


def save_individual(images: torch.Tensor, out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    for i, tile in enumerate(pil_arrays(images)):
        Image.fromarray(tile).save(os.path.join(out_dir, f"{i:06d}.png"))
    return len(images)


def sample_run(run_dir: str, n: int, out: str | None, out_dir: str | None, seed: int,
               steps: int | None, cfg: float | None, batch_size: int = 256) -> torch.Tensor:
    task = load_generator(generator_checkpoint(run_dir))
    chunks = []
    for start in range(0, n, batch_size):
        # Each chunk has its own seed, derived from the user's, so the same seed gives the same images.
        chunks.append(task.sample(min(batch_size, n - start), seed=seed + start, steps=steps, cfg_scale=cfg))
    images = torch.cat(chunks)
    if out:
        save_grid(images, out)
    if out_dir:
        save_individual(images, out_dir)
    return images
