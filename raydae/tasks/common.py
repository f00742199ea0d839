"""Small pieces every task uses: learning-rate warm-up, the optimiser step, parameter counts and image grids."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from raydae.models import count_parameters
from raydae.pixels import unit_interval


def warmup_scale(step: int, warmup_steps: int, total_steps: int = 0, schedule: str = "constant") -> float:
    """Linear learning-rate warm-up, then constant, or (schedule "cosine") a cosine decay to 0 at total_steps."""
    scale = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, max(0.0, (step - warmup_steps) / (total_steps - warmup_steps)))
        scale *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return scale


def set_learning_rate(optimizers: dict, lr_scale: float) -> None:
    """Scale every optimizer's base learning rate (remembered on first use) by `lr_scale`."""
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * lr_scale


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_parameters=None,
                   grad_clip: float = 0.0) -> None:
    """Zero the gradients, backpropagate `loss`, clip the norm of `clip_parameters`' gradients (grad_clip > 0), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(clip_parameters, grad_clip)
    optimizer.step()


def parameter_counts(models: dict[str, nn.Module]) -> dict[str, int]:
    """Parameters of every module, by name (trained and frozen alike)."""
    return {name: count_parameters(module) for name, module in models.items()}


def place_modules(models: dict[str, nn.Module], frozen: set[str], device: torch.device) -> None:
    """Move every module to `device`; the frozen ones go to eval mode with gradients off."""
    for name, module in models.items():
        module.to(device)
        if name in frozen:
            module.eval()
            module.requires_grad_(False)


@contextlib.contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode for the block, then give each back the mode it had."""
    modes = [(module, module.training) for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Tile (N,3,H,W) images in [-1, 1] into one CHW image in [0, 1] (torchvision-free)."""
    images = unit_interval(images.detach().cpu().float())
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top: top + h, left: left + w] = images[i]
    return grid
