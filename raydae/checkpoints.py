"""Checkpoints: the training-state format written by the worker loop, and reading it back on any machine.

A checkpoint folder holds `state.pt` (`config`, `stage`, `step`, model and optimiser state, attempt
`history`, the generator's latent facts), `config.yaml` and `metrics.json`. Reading one needs no Ray Train worker:
the driver (pipeline, latents, evaluation) and `raydae sample` load trained tasks from it. Ray is imported
only to fetch a checkpoint given by URI (local, NFS or s3://), not when this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from raydae.config import Config
from raydae.devices import pick_device
from raydae.errors import UserError
from raydae.tasks import make_task

STATE_FILE = "state.pt"


def save_training_state(folder: str, task, config: Config, stage: str, step: int, history: list,
                        data_position: dict | None = None) -> None:
    state = {
        "format": "raydae-checkpoint-v1",
        "config": config.to_dict(),
        "stage": stage,
        "step": step,
        "models": {name: module.state_dict() for name, module in task.models.items()},
        "optimizers": {name: opt.state_dict() for name, opt in task.optimizers.items()},
        "history": history,
        "data_position": data_position,  # {"pass", "batch"}: where a resumed stage picks up the training data
        # What a task needs beyond the config to rebuild itself (e.g. DiT's latent scale).
        "latent_facts": getattr(task, "latent_facts", {}),
    }
    torch.save(state, os.path.join(folder, STATE_FILE))
    Path(folder, "config.yaml").write_text(config.to_yaml())


def prepare_for_training(task, device: torch.device, state: dict | None = None, previous_stage: dict | None = None,
                         wrap=lambda module: module) -> None:
    """Put `task` on `device` ready to train: resumed from a checkpoint's `state` (weights and optimizers),
    else started from `previous_stage`'s weights (stage 2 from stage 1, a generator from its autoencoder)."""
    if state is not None:
        for name, module in task.models.items():
            module.load_state_dict(state["models"][name])
    elif previous_stage is not None:
        task.load_previous_stage(previous_stage)
    task.prepare(device, wrap=wrap)
    if state is not None:
        for name, opt in task.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            for group in opt.param_groups:  # the saved groups carry the kernel choice of the device they ran on
                for kernel in ("fused", "foreach"):
                    if kernel in opt.defaults:
                        group[kernel] = opt.defaults[kernel]


def load_state(folder: str) -> dict:
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)


@contextlib.contextmanager
def checkpoint_folder(uri: str) -> Iterator[str]:
    """A local folder holding the checkpoint at `uri` (the folder itself when it is local)."""
    import ray.train  # heavy: only when a checkpoint is read, never when raydae.sampling is imported

    with ray.train.Checkpoint(uri).as_directory() as folder:
        yield folder


def load_checkpoint_state(uri: str) -> dict:
    """The training state of a checkpoint given by path or URI (local, NFS or s3://)."""
    with checkpoint_folder(uri) as folder:
        return load_state(folder)


def check_checkpoint(uri: str, what: str, hint: str) -> None:
    """Refuse a checkpoint that is gone or does not load (e.g. truncated), in one line that names it.

    `what` says whose checkpoint it is ("generator checkpoint"), `hint` what the user can do about it."""
    try:
        with checkpoint_folder(uri) as folder:
            if not os.path.isfile(os.path.join(folder, STATE_FILE)):
                raise UserError(f"{what} {uri} is missing (no {STATE_FILE}); {hint}")
            load_state(folder)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, zip and filesystem errors alike mean "cannot be read"
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"{what} {uri} cannot be read ({type(err).__name__}: {reason[:200]}); {hint}") from None


def read_checkpoint_file(uri: str, name: str) -> str | None:
    """A small file (config.yaml, metrics.json) of a checkpoint, or None when it has none."""
    with checkpoint_folder(uri) as folder:
        path = Path(folder, name)
        return path.read_text() if path.is_file() else None


def load_task(checkpoint_uri: str, stages: tuple[str, ...], device: str | None = None):
    """The task of a finished checkpoint with its trained weights, frozen, on `device` (default: GPU if any)."""
    state = load_checkpoint_state(checkpoint_uri)
    if state.get("stage") not in stages:
        raise UserError(f"{checkpoint_uri} is a {state.get('stage')} checkpoint, not a {' or '.join(stages)} one")
    config = Config.from_dict(state["config"])
    # Checkpoints written before the rename call the latent facts "task_options".
    task = make_task(config, state["stage"], state.get("latent_facts", state.get("task_options")))
    for name, module in task.models.items():
        module.load_state_dict(state["models"][name])
    target = torch.device(device) if device else pick_device()
    for module in task.models.values():
        module.to(target).eval().requires_grad_(False)
    return task


def load_generator(checkpoint_uri: str, device: str | None = None):
    return load_task(checkpoint_uri, ("generator",), device)
