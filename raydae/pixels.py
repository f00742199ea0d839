"""Pixel conversions between the data's uint8 [0, 255], the models' [-1, 1] and pictures' [0, 1]. Torch only.

Data sets yield uint8 images (4x fewer bytes through Ray's object store and to the GPU than float32); models
read and write [-1, 1]; image grids and the reconstruction metrics work in [0, 1]. Rounding is half to even
(`torch.round`), after clamping, in every conversion back to uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def model_input(images: Tensor) -> Tensor:
    """uint8 N x 3 x H x W (any device) -> float32 in [-1, 1]: the models' input.

    Floating-point images are taken to be model input already (evaluation's own batches) and pass as they are.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (as the data sets yield them) or float model input, got {images.dtype}")
    return images


def uint8_pixels(images: Tensor) -> Tensor:
    """Model output in [-1, 1] -> uint8 in [0, 255], same shape and device (clamped, then rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def unit_interval(images: Tensor) -> Tensor:
    """Model output in [-1, 1] -> [0, 1] (clamped): image grids and the reconstruction metrics."""
    return ((images + 1) / 2).clamp(0, 1)


def unit_to_uint8(images: Tensor) -> Tensor:
    """[0, 1] -> uint8 in [0, 255] (rounded), same shape."""
    return (images * 255).round().to(torch.uint8)


def pil_arrays(images: Tensor) -> np.ndarray:
    """Model output N x 3 x H x W in [-1, 1] -> uint8 N x H x W x 3 numpy on the CPU: what PIL writes as files."""
    return uint8_pixels(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()
