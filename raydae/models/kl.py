"""Diagonal-Gaussian (KL-regularised) bottleneck, as in LDM's `DiagonalGaussianDistribution`."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from raydae.models.bottleneck import BottleneckOutput

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # keeps exp(logvar) finite early in training
SIGN_SCRAMBLE_SEED = 20231211  # one fixed pattern per latent shape, the same in every run


@lru_cache(maxsize=8)
def _sign_pattern(shape: tuple[int, int, int]) -> Tensor:
    generator = torch.Generator().manual_seed(SIGN_SCRAMBLE_SEED)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def sign_scramble(z: Tensor) -> Tensor:
    """Multiplies (B, C, h, w) latents by a fixed random +-1 pattern; applying it twice is the identity."""
    return z * _sign_pattern(tuple(z.shape[1:])).to(device=z.device, dtype=z.dtype)


class DiagonalGaussianBottleneck(nn.Module):
    """Splits encoder features (B, 2C, h, w) into mean and log-variance; samples z ~ N(mean, var).

    loss = kl_weight * KL(q(z|x) || N(0, I)), summed over latent dims and averaged over the batch.
    """

    def __init__(self, latent_channels: int, kl_weight: float, scramble: bool = False):
        super().__init__()
        self.latent_channels = latent_channels
        self.kl_weight = kl_weight
        self.scramble = scramble  # ae.sign_scramble: the decoder undoes it, the generator sees it

    def _posterior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if h.shape[1] != 2 * self.latent_channels:
            raise ValueError(
                f"KL bottleneck expects {2 * self.latent_channels} channels (mean and logvar), got {h.shape[1]}"
            )
        mean, logvar = h.float().chunk(2, dim=1)  # float32: exp/log are fragile under bf16
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _scrambled(self, z: Tensor) -> Tensor:
        return sign_scramble(z) if self.scramble else z

    def encode(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, as the generator sees them (N(mean, var) is symmetric in sign)."""
        mean, logvar = self._posterior(h)
        return self._scrambled(mean), logvar

    def forward(self, h: Tensor, sample: bool = True) -> BottleneckOutput:
        mean, logvar = self._posterior(h)
        std = torch.exp(0.5 * logvar)
        # Drawn before the scramble, so a scrambled run trains bit for bit like the plain one (the decoder undoes it).
        z = self._scrambled(mean + std * torch.randn_like(mean) if sample else mean)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # per image
        kl_mean = kl.mean()
        stats = {
            "kl": kl_mean.detach(),
            "latent_std": z.detach().std(),  # LDM rescales latents by 1/std before the prior
            "posterior_std": std.detach().mean(),
        }
        return BottleneckOutput(z=z, loss=self.kl_weight * kl_mean, stats=stats, indices=None,
                                posterior=(self._scrambled(mean), logvar))
