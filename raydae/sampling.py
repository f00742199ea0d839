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
import yaml
from PIL import Image

from raydae.checkpoints import load_generator, read_checkpoint_file
from raydae.config import Config
from raydae.errors import UserError
from raydae.pixels import pil_arrays, unit_to_uint8
from raydae.progress import Progress
from raydae.seeds import derive_seed
from raydae.storage import RunFolder
from raydae.tasks import make_grid


def generator_checkpoint(run_dir: str) -> str:
    run = RunFolder.from_path(run_dir)
    if not run.exists():
        raise UserError(f"{run_dir}: no such run folder")
    if not run.exists("generator.done.json"):
        raise UserError(f"{run_dir}: has no finished generator (config generator: none, or the run is unfinished)")
    try:
        return run.read_json("generator.done.json")["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{run_dir}: generator.done.json cannot be read ({type(err).__name__}); "
                        "train the run again under a new --name") from None


def load_run_generator(run_dir: str):
    """The run's trained generator, refused in one line when its checkpoint is gone, unreadable, or another
    run's (its config is not the run folder's config.yaml): nothing is drawn or written then."""
    uri = generator_checkpoint(run_dir)
    run = RunFolder.from_path(run_dir)
    if not run.exists("config.yaml"):
        raise UserError(f"{run_dir}: not a raydae run folder (no config.yaml)")
    hint = "restore the run folder as `raydae run` left it, or train the run again under a new --name"
    try:
        saved = read_checkpoint_file(uri, "config.yaml")
        if saved is None:
            raise FileNotFoundError("no config.yaml in it")
        differing = _config_differences(yaml.safe_load(run.read_text("config.yaml")), yaml.safe_load(saved))
        if not differing:
            return load_generator(uri)
    except Exception as err:  # noqa: BLE001 - a missing folder, a truncated state.pt, a bad zip: all "cannot be read"
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{run_dir}: its generator checkpoint {uri} cannot be read ({type(err).__name__}: "
                        f"{reason}); {hint}") from None
    raise UserError(f"{run_dir}: its generator checkpoint {uri} was trained by another run (config differs: "
                    f"{', '.join(differing[:3])}{' ...' if len(differing) > 3 else ''}); {hint}")


def _config_differences(run_config: dict, checkpoint_config: dict) -> list[str]:
    """Fields (dotted) where two resolved configs differ; eval.* may differ (it does not change what trained)."""
    run_flat = _flatten(Config.from_dict(run_config).to_dict())
    checkpoint_flat = _flatten(Config.from_dict(checkpoint_config).to_dict())
    return [f"{key}: {run_flat.get(key)!r} vs {checkpoint_flat.get(key)!r}"
            for key in sorted(set(run_flat) | set(checkpoint_flat))
            if not key.startswith("eval.") and run_flat.get(key) != checkpoint_flat.get(key)]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    if n <= 0:
        raise UserError(f"--n {n}: give a positive number of samples")
    task = load_run_generator(run_dir)
    chunks = []
    progress = Progress("sample", "drawing samples", total=n, unit="samples", announce=n > batch_size)
    for start in range(0, n, batch_size):
        # Each chunk has its own seed, derived from the user's, so the same seed gives the same images (and
        # seeds a batch apart share none: seed + start would).
        chunks.append(task.sample(min(batch_size, n - start), seed=derive_seed(seed, start), steps=steps,
                                  cfg_scale=cfg))
        progress.advance(len(chunks[-1]))
    if n > batch_size:
        progress.finish()
    images = torch.cat(chunks)
    if out:
        save_grid(images, out)
    if out_dir:
        save_individual(images, out_dir)
    return images
