"""A self-supervised feature network for unlabelled data: a conv net that learns to see damage in real images.

For data without classes (an image folder without sub-folders, a one-label Parquet set) no classifier can
be trained. This net is trained on the real images alone: each training image is left clean, blurred or
noised at a random strength, and the net estimates both strengths from the image. Its pooled
penultimate features make the `selfsup` space (`fd_selfsup`, `kd_selfsup`) — NOT FID, comparable only
between runs scored with the same saved net.

Why not an autoencoder: on builtin:shapes (32×32, 300 steps) the pooled encoder features of a plain and of
a denoising autoencoder were nearly as blind as the random net (blur sigma 2 at 1.8–1.9× the real-vs-real
floor, noise sigma 0.2 at 2.4–2.9×, not monotone). This net, at the default 1500 steps, put them at 980× and
1120×, 8×8-shuffled images (a damage it never sees in training) at 190× and flat colour blobs at 2400× (the
random net: 1.7×, 3.6×, 1.7×, 4×); at 300 steps, a single shape class at 10–13×. `feature_sensitivity`
measures this, tests/test_feature_spaces.py checks it.

Plain PyTorch; deterministic for a seed (local generators for initialisation, batches and corruptions).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from raydae.eval.classifier import ConvClassifier, as_model_input, fit, initialise_weights, random_flips
from raydae.eval.sensitivity import gaussian_blur

MAX_BLUR, MAX_NOISE = 3.0, 0.3  # training strengths reach past the sensitivity check's levels (2.0, 0.2)


# ------------------------------------------------------------------------------------- model
class DegradationEstimator(ConvClassifier):
    """The classifier's conv net with two outputs: the blur and the noise strength it sees in an image,
    each as a fraction of `MAX_BLUR` / `MAX_NOISE` (0 for a clean image).

    `features()` (inherited) returns the pooled 8·`width` penultimate vector, the `selfsup` space.
    """

    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__(2, in_channels, width)
        self.config = {"in_channels": in_channels, "width": width}

    @torch.no_grad()
    def estimate(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """`(N, C, H, W)` images (uint8 or [-1, 1]) -> `(N, 2)` estimated (blur, noise) strengths in [0, 1]."""
        return self.logits(images, batch_size)


# ---------------------------------------------------------------------------------- training
def corrupt(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per image one of: clean, Gaussian blur (sigma up to `MAX_BLUR`), Gaussian noise (sigma up to `MAX_NOISE`
    of the pixel range); returns the images and `(N, 2)` targets (blur, noise strength in [0, 1])."""
    n = images.shape[0]
    kind = torch.randint(0, 3, (n,), generator=generator)  # 0 clean, 1 blur, 2 noise
    strength = torch.rand(n, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    out = images.clone()
    for i in torch.nonzero(kind == 1).flatten().tolist():
        out[i : i + 1] = gaussian_blur(images[i : i + 1], max(float(strength[i]) * MAX_BLUR, 0.05))
    noisy = (kind == 2)[:, None, None, None]
    sigma = (strength * MAX_NOISE)[:, None, None, None]
    out = torch.where(noisy, (images + 2.0 * sigma * noise).clamp(-1, 1), out)
    targets = torch.stack([strength * (kind == 1), strength * (kind == 2)], dim=1)
    return out, targets


def train_degradation_estimator(
    images: Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup_steps: int = 100,
    weight_decay: float = 5e-4,
    width: int = 16,
    seed: int = 0,
    val: Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DegradationEstimator, dict]:
    """Train a `DegradationEstimator` on real images; return it frozen (eval mode) and an info dict.

    Mean squared error of the estimated strengths, AdamW, a linear warmup then a cosine decay to 0, random
    left-right flips (mirrored real images are still real images; upside-down photos are not).

    Info: `train_error` (on the first 1000 training images) and `val_error` (None without `val`), the
    root mean squared error of the estimated strengths on freshly corrupted copies; `seconds`,
    `num_train` and the settings.
    """
    images = as_model_input(images)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    model = DegradationEstimator(images.shape[1], width)
    initialise_weights(model, generator)
    n = images.shape[0]
    batch_size = min(batch_size, n)

    def batch_loss(index: Tensor) -> Tensor:
        x, targets = corrupt(random_flips(images[index], generator, vertical=False), generator)
        return F.mse_loss(model(x.to(device)), targets.to(device))

    fit(model, batch_loss, n, steps, batch_size, lr, warmup_steps, weight_decay, generator, device)
    seconds = time.perf_counter() - start
    check = torch.Generator().manual_seed(seed + 1)  # the same corruptions for every net of this seed
    info = {
        "train_error": estimate_error(model, images[:1000], check),
        "val_error": estimate_error(model, as_model_input(val), check) if val is not None else None,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "weight_decay": weight_decay,
        "width": width,
        "seed": seed,
        "num_train": n,
        "seconds": seconds,
    }
    return model, info


@torch.no_grad()
def estimate_error(model: DegradationEstimator, images: Tensor, generator: torch.Generator) -> float:
    """Root mean squared error of the strengths the frozen net estimates on corrupted copies of `images`."""
    corrupted, targets = corrupt(images, generator)
    return float(F.mse_loss(model.estimate(corrupted), targets).sqrt())


# ----------------------------------------------------------------------------- save / load
def save_degradation_estimator(model: DegradationEstimator, path_or_file, info: dict | None = None) -> None:
    """Write weights, architecture arguments and `info` with `torch.save` (a path or a binary file object)."""
    torch.save({"config": dict(model.config), "state_dict": model.state_dict(), "info": dict(info or {})}, path_or_file)


def load_degradation_estimator(path_or_file, map_location: str | torch.device = "cpu",
                               ) -> tuple[DegradationEstimator, dict]:
    """Rebuild a saved net alone (frozen, eval mode); returns `(model, info)`."""
    payload = torch.load(path_or_file, map_location=map_location, weights_only=True)
    model = DegradationEstimator(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval().requires_grad_(False), payload["info"]
