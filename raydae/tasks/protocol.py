"""What a task gives the training skeleton (`loop.py`): the one interface every stage implements."""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from raydae.config import GeneratorTrainConfig, TrainConfig


class Task(Protocol):
    """A stage's modules, what of them it trains, how one step trains and how it is evaluated and shown."""

    models: dict[str, nn.Module]  # every module whose state goes into the checkpoint
    frozen: set[str]  # names in `models` it does not train
    train_config: TrainConfig | GeneratorTrainConfig  # batch size, warm-up, cadence of logs, image grids, checkpoints
    batch_dtypes: dict[str, torch.dtype]  # the dataset columns it reads
    progress_keys: tuple[str, ...]  # logged means the progress line shows
    image_tag: str  # TensorBoard tag of `image_grid`
    optimizers: dict[str, torch.optim.Optimizer]  # filled by `prepare`; checkpointed by name

    def load_previous_stage(self, state: dict) -> None:
        """Start from the previous stage's checkpoint state (stage 2 from stage 1, a generator from its autoencoder)."""

    def prepare(self, device: torch.device, wrap: Callable[[nn.Module], nn.Module] = ...) -> None:
        """Move to `device`, freeze `frozen`, wrap the trained modules (DDP) and build the optimizers."""

    def train_step(self, batch: dict, step: int, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """One optimisation step on `batch`; the scalars to log, as detached 0-d tensors left on the device (the
        loop reads them back once per log window: a read every step would make the host wait for the GPU)."""

    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out metrics over `batches`, on the plain (unwrapped) modules."""

    def image_grid(self, batch: dict, max_images: int = ...) -> torch.Tensor:
        """A CHW picture in [0, 1] for TensorBoard."""

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of every module in `models`, by name."""
