"""Cheap measures of a latent space, taken right after the autoencoder stages, before any generator trains.

Plain PyTorch: spectral high-frequency energy, per-channel scale and tails, (through
`raydae.losses.equivariance_error`) how far encode/decode are from commuting with image transforms, and
the held-out loss of a small probe generator trained briefly on the latents.
`latent_quality` returns them as a flat dict of floats, the `latent_quality` section of metrics.json;
`raydae report` ranks them against the final sample distance over a sweep (Spearman ρ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from raydae import losses
from raydae.diffusion import GaussianDiffusion
from raydae.models.dit import DiT

HF_CUTOFF = 0.5  # share of energy above half the Nyquist frequency (radially)
# EQ-VAE's downscalings, fixed here rather than taken from a run's config, so every run of a sweep is
# measured under the same transforms (0.5 and 0.75 of the latent side must be whole, e.g. side 8).
EQUIVARIANCE_SCALES = (0.5, 0.75)
# The probe generator: one fixed small DiT, schedule and budget for every run, so its held-out loss compares
# latents (each normalised to unit std first, as the generator sees them) rather than model settings.
PROBE_GENERATOR = dict(hidden_size=128, depth=2, num_heads=4)
PROBE_TIMESTEPS = 1000
KEYS = ("hf_energy", "channel_std_mean", "channel_std_min", "channel_std_min_ratio", "kurtosis_max_abs",
        "kurtosis_mean")  # stable: they are the keys under metrics.json["latent_quality"]


def _check_latents(z: Tensor) -> Tensor:
    if z.dim() != 4 or z.numel() == 0:
        raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got shape {tuple(z.shape)}")
    return z.detach().cpu().to(torch.float64)  # float64: fourth moments of float32 latents lose digits


def radial_frequency(height: int, width: int) -> Tensor:
    """|f| of each 2D FFT bin as a multiple of the Nyquist frequency (0 at DC, 1 at Nyquist, √2 in the corners)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64) / 0.5  # cycles per sample / Nyquist
    fx = torch.fft.fftfreq(width, dtype=torch.float64) / 0.5
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # (H, W)


def high_frequency_energy(z: Tensor, cutoff: float = HF_CUTOFF) -> float:
    """Share of spectral energy above `cutoff` x Nyquist: ~0 for smooth latents, ~0.8 for white noise at 0.5.

    Power |FFT|² per image and channel after removing that channel's spatial mean, summed over channels
    and averaged over images; the share is (energy above the cutoff) / (all energy). A latent with no
    spatial variation at all has no energy anywhere and gets 0.
    """
    z = _check_latents(z)
    centred = z - z.mean(dim=(2, 3), keepdim=True)  # the DC bin would otherwise dominate every spectrum
    power = torch.fft.fft2(centred).abs().square().sum(dim=1).mean(dim=0)  # (H, W)
    total = power.sum().item()
    if total <= 0.0:
        return 0.0
    high = power[radial_frequency(*z.shape[2:]) > cutoff].sum().item()
    return high / total


def channel_statistics(z: Tensor) -> dict:
    """Per-channel std and excess kurtosis over all N·H·W values (population moments, like numpy/scipy defaults).

    Returns {"std": [C floats], "kurtosis": [C floats], "std_mean", "std_min", "std_min_ratio" (min / mean),
    "kurtosis_max_abs", "kurtosis_mean"}. A constant channel's kurtosis is NaN (0/0); the kurtosis summaries
    are over the other channels (NaN when none is left), while std_min = 0 shows the dead channel.
    """
    z = _check_latents(z)
    values = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, N·H·W)
    centred = values - values.mean(dim=1, keepdim=True)
    m2 = centred.square().mean(dim=1)
    m4 = centred.pow(4).mean(dim=1)
    std = m2.sqrt()
    kurtosis = torch.where(m2 > 0, m4 / m2.square() - 3.0, torch.full_like(m2, math.nan))
    finite = kurtosis[torch.isfinite(kurtosis)]
    std_mean = std.mean().item()
    return {
        "std": std.tolist(),
        "kurtosis": kurtosis.tolist(),
        "std_mean": std_mean,
        "std_min": std.min().item(),
        "std_min_ratio": std.min().item() / std_mean if std_mean > 0 else math.nan,
        "kurtosis_max_abs": finite.abs().max().item() if finite.numel() else math.nan,
        "kurtosis_mean": finite.mean().item() if finite.numel() else math.nan,
    }


def _metric_name(name: str) -> str:
    """`decoder_error/scale0.5` -> `equivariance_decoder_error_scale0p5`: no `.` (report paths split on it), no `/`."""
    return "equivariance_" + name.replace("/", "_").replace(".", "p")


def equivariance_errors(encoder: Callable[[Tensor], Tensor], decoder: Callable[[Tensor], Tensor], images: Tensor,
                        scales: Sequence[float] = EQUIVARIANCE_SCALES, rotations: bool = True) -> dict[str, float]:
    """`raydae.losses.equivariance_error` (the regulariser's own transforms) as flat `equivariance_*` floats.

    encoder: images -> the latents decoder reads (e.g. the KL mean); images in [-1, 1], (B, 3, H, W).
    Keys: equivariance_decoder_error, equivariance_encoder_error (means over the transforms),
    equivariance_reconstruction_error (untransformed baseline), and per transform e.g.
    equivariance_decoder_error_scale0p5, equivariance_encoder_error_rot90.
    """
    result = losses.equivariance_error(encoder, decoder, images, list(scales), rotations)
    return {_metric_name(name): float(value) for name, value in result.items()}


def probe_generator_loss(z: Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3, held_out: float = 0.2,
                         seed: int = 0) -> float:
    """Held-out v-prediction loss of a small unconditional DiT after `steps` steps on these latents.

    z: (N, C, H, W), N >= 10. The latents are scaled to unit std (the generator's normalisation); the last
    `held_out` share is scored at fixed timesteps and noise. Lower means the latent is easier to fit in a
    short budget; a loss of 1 is what predicting zero scores. Same draws for every run (seed)."""
    z = _check_latents(z).float()
    if z.shape[0] < 10 or steps < 1:
        raise ValueError(f"probe generator: needs >= 10 latents and >= 1 step, got {z.shape[0]} and {steps}")
    z = z / z.std().clamp_min(1e-8)
    count = z.shape[0] - max(int(z.shape[0] * held_out), 2)
    train, test = z[:count], z[count:]
    height, width = z.shape[2:]
    patch = 2 if height % 2 == 0 and width % 2 == 0 else 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiT(input_size=(height, width), patch_size=patch, in_channels=z.shape[1], **PROBE_GENERATOR)
    diffusion = GaussianDiffusion(PROBE_TIMESTEPS, schedule="cosine", prediction="v")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, count, (min(batch_size, count),), generator=generator)
        loss = diffusion.training_loss(model, train[rows], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    scoring = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        t = torch.randint(0, PROBE_TIMESTEPS, (test.shape[0],), generator=scoring)
        noise = torch.randn(test.shape, generator=scoring)
        return float(diffusion.training_loss(model, test, noise=noise, t=t))


def latent_quality(z: Tensor, encoder: Callable[[Tensor], Tensor] | None = None,
                   decoder: Callable[[Tensor], Tensor] | None = None, images: Tensor | None = None,
                   cutoff: float = HF_CUTOFF, scales: Sequence[float] = EQUIVARIANCE_SCALES,
                   rotations: bool = True, probe_steps: int = 0) -> dict[str, float]:
    """The flat dict stored as metrics.json["latent_quality"]: KEYS, plus equivariance_* with encoder, decoder,
    images, plus probe_generator_loss when probe_steps > 0.

    z: (N, C, H, W) latents of held-out images from the frozen encoder (posterior means are fine).
    encoder, decoder, images: as for `equivariance_errors` (all three or none); scales, rotations go there.
    """
    stats = channel_statistics(z)
    out = {
        "hf_energy": high_frequency_energy(z, cutoff),
        "channel_std_mean": stats["std_mean"],
        "channel_std_min": stats["std_min"],
        "channel_std_min_ratio": stats["std_min_ratio"],
        "kurtosis_max_abs": stats["kurtosis_max_abs"],
        "kurtosis_mean": stats["kurtosis_mean"],
    }
    given = [part is not None for part in (encoder, decoder, images)]
    if any(given) and not all(given):
        raise ValueError("latent_quality: equivariance needs encoder, decoder and images together")
    if all(given):
        out.update(equivariance_errors(encoder, decoder, images, scales, rotations))
    if probe_steps > 0:
        out["probe_generator_loss"] = probe_generator_loss(z, probe_steps)
    return out
