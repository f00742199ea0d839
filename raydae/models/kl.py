"""Diagonal-Gaussian (KL-regularised) bottleneck, as in LDM's `DiagonalGaussianDistribution`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydae.models.bottleneck import BottleneckOutput

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # keeps exp(logvar) finite early in training


class DiagonalGaussianBottleneck(nn.Module):
    """Splits encoder features (B, 2C, h, w) into mean and log-variance; samples z ~ N(mean, var).

    loss = kl_weight * KL(q(z|x) || N(0, I)), summed over latent dims and averaged over the batch.
    """

    def __init__(self, latent_channels: int, kl_weight: float):
        super().__init__()
        self.latent_channels = latent_channels
        self.kl_weight = kl_weight

    def encode(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if h.shape[1] != 2 * self.latent_channels:
            raise ValueError(
                f"KL bottleneck expects {2 * self.latent_channels} channels (mean and logvar), got {h.shape[1]}"
            )
        mean, logvar = h.float().chunk(2, dim=1)  # float32: exp/log are fragile under bf16
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, h: Tensor, sample: bool = True) -> BottleneckOutput:
        mean, logvar = self.encode(h)
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn_like(mean) if sample else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # per image
        kl_mean = kl.mean()
        stats = {
            "kl": kl_mean.detach(),
            "latent_std": z.detach().std(),  # LDM rescales latents by 1/std before the prior
            "posterior_std": std.detach().mean(),
        }
        return BottleneckOutput(z=z, loss=self.kl_weight * kl_mean, stats=stats, indices=None)
