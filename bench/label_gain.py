"""How much finished runs' class-conditional generators use their labels, with today's code.

For each run folder: its generator's held-out loss on the run's stored val latents, and the label gain
(`GeneratorTask.wrong_labels`: the loss with every label moved to the next class, minus the loss with the
right ones; about 0 means the generator ignores its labels). Runs that finished before the gain was
reported get it here. No Ray cluster; one run at a time, on the CPU.

    python bench/label_gain.py RUN_FOLDER [RUN_FOLDER ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch

from raydae.checkpoints import load_generator
from raydae.latents import latent_batches


def val_batch(latents_uri: str) -> dict:
    batches = list(latent_batches(f"{latents_uri.rstrip('/')}/val"))
    return {name: torch.from_numpy(np.concatenate([batch[name] for batch in batches])) for name in batches[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders with a finished generator")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in map(Path, args.runs):
        generator = json.loads((run / "generator.done.json").read_text())
        latents = json.loads((run / "latents.done.json").read_text())
        task = load_generator(generator["checkpoint"], device="cpu")
        if not task.conditional:
            print(f"{run.name}: unconditional generator, no labels to use")
            continue
        scores = task.evaluate([val_batch(latents["uri"])])
        loss = scores.get("val/diffusion_loss", scores.get("val/cross_entropy"))
        print(f"{run.name}: held-out loss {loss:.4f}, label gain {scores['val/label_gain']:.6f}", flush=True)


if __name__ == "__main__":
    main()
