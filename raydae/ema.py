"""Exponential moving average of a model's weights, the copy DiT (and most diffusion work) samples from.

    ema_model = ema_copy(model)                    # once, before training
    ema_update(ema_model, model, decay=0.9999)     # after every optimizer step

Under DDP pass the wrapped module, `ema_update(ema_model, ddp_model.module, decay)`, and build the copy
from `.module` too: the DDP wrapper prefixes every name with "module.", and `ema_update` matches by
name, so a mix-up fails loudly instead of silently averaging the wrong tensors. Every rank holds the
same weights after a DDP step, so every rank's EMA stays identical without any communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval() mode with requires_grad off: it is only ever written by `ema_update`."""
    ema_model = copy.deepcopy(model)
    ema_model.requires_grad_(False)
    return ema_model.eval()


def _matching(ema_named: dict, named: dict, kind: str) -> None:
    if ema_named.keys() != named.keys():
        missing = sorted(named.keys() - ema_named.keys())[:3]
        extra = sorted(ema_named.keys() - named.keys())[:3]
        raise ValueError(
            f"EMA model and model have different {kind}: missing {missing}, unexpected {extra} "
            "(a DDP-wrapped model should be passed as .module)"
        )


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ema = decay * ema + (1 - decay) * param for each parameter; buffers are copied as they are.

    Buffers (e.g. running statistics, VQ codebooks) are state, not weights being learned, so averaging
    them is not meaningful; the EMA model takes the current values. decay = 0 makes an exact copy.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    ema_params, params = dict(ema_model.named_parameters()), dict(model.named_parameters())
    _matching(ema_params, params, "parameters")
    averages = [ema_params[name] for name in params]
    # One multi-tensor kernel per operation instead of two per parameter (a DiT-B has ~130 of them: on a GPU the
    # per-parameter launches cost more than the arithmetic). The same roundings as the formula written out:
    # decay * ema, then (1 - decay) * param, then their sum (add_(..., alpha=) may fuse and round differently).
    if averages:  # the multi-tensor ops refuse an empty list (a module with buffers only)
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, torch._foreach_mul(
            [param.detach().to(ema.dtype) for param, ema in zip(params.values(), averages)], 1.0 - decay))
    ema_buffers, buffers = dict(ema_model.named_buffers()), dict(model.named_buffers())
    _matching(ema_buffers, buffers, "buffers")
    for name, buffer in buffers.items():
        ema_buffers[name].copy_(buffer)


def warmed_up_decay(decay: float, step: int) -> float:
    """The decay to use at optimizer step `step` (0-based): min(decay, (1 + step) / (10 + step)).

    A constant decay keeps decay ** steps of the random initial weights in the average (0.999 over
    2 000 steps: 13.5 %); the warm-up, as diffusers' EMAModel does by default, forgets them early."""
    return min(decay, (1.0 + step) / (10.0 + step))


class ExponentialMovingAverage:
    """Holds an EMA copy and its decay: `ema = ExponentialMovingAverage(model, 0.9999)`, then
    `ema.update(model)` after each optimizer step and sample from `ema.model`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.model = ema_copy(model)

    def update(self, model: nn.Module, decay: float | None = None) -> None:
        ema_update(self.model, model, self.decay if decay is None else decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
