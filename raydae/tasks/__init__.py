"""What each kind of training trains, freezes, optimises and logs. Plain PyTorch: no Ray here.

The training skeleton in `loop.py` is the same for every stage; what a task gives it is the `Task` protocol
(protocol.py): its modules and which are frozen, its train_config, the dataset columns it reads, `prepare` (DDP-wrap
what it trains), `train_step`, `evaluate`, `image_grid` and `parameter_counts`.
"""

from raydae.config import Config
from raydae.tasks.autoencoder import (
    AUTOENCODER_STAGES,
    Autoencoder,
    AutoencoderTask,
    describe_signature,
    encode_images,
    latent_signature,
    run_bottleneck,
)
from raydae.tasks.common import make_grid, set_learning_rate, warmup_scale
from raydae.tasks.generators import make_generator_task
from raydae.tasks.protocol import Task


def make_task(config: Config, stage: str, latent_facts: dict | None = None) -> Task:
    """The task for `stage`; the loop only ever calls this."""
    if stage in AUTOENCODER_STAGES:
        return AutoencoderTask(config, stage)
    if stage == "generator":
        return make_generator_task(config, latent_facts or {})
    raise ValueError(f"unknown stage {stage!r}")


__all__ = [
    "AUTOENCODER_STAGES", "Autoencoder", "AutoencoderTask", "Task", "describe_signature", "encode_images",
    "latent_signature", "make_grid", "make_task", "run_bottleneck", "set_learning_rate", "warmup_scale",
]
