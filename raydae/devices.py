"""Which torch device a driver-side job (encoding, evaluation, sampling) runs on; Train workers get theirs from Ray."""

from __future__ import annotations

import torch


def pick_device(use_gpu: bool = True) -> torch.device:
    """The first GPU when `use_gpu` and one is visible, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
