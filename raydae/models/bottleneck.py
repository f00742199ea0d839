"""What every bottleneck returns, so training code treats KL and VQ alike."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class BottleneckOutput:
    z: Tensor  # latents for the decoder, (B, latent_channels, h, w)
    loss: Tensor  # the already-weighted regularisation term: add it to the total loss as is
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for logging
    indices: Tensor | None = None  # VQ code indices (B, h, w), long; None for KL
    posterior: tuple[Tensor, Tensor] | None = None  # KL's (mean, logvar), each (B, latent_channels, h, w); None for VQ
