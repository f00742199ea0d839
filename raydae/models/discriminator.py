"""PatchGAN discriminator (pix2pix / taming-transformers), with GroupNorm instead of BatchNorm.

BatchNorm statistics differ per DDP rank and are noisy at the small per-worker batches raydae
trains with; GroupNorm has neither problem.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class NLayerDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, H', W').

    `num_layers` stride-2 4x4 convs, then two stride-1 4x4 convs; for 32x32 inputs and 3 layers the
    output is 2x2 patches. Inputs need H, W >= 2 ** (num_layers + 2) or the last conv has no room.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for n in range(1, num_layers):
            out = base_channels * min(2**n, 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            ch = out
        out = base_channels * min(2**num_layers, 8)
        layers += [nn.Conv2d(ch, out, 4, stride=1, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(out, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # DCGAN init, as pix2pix and taming use: it matters for how fast the hinge loss moves early on.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
