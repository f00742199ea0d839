"""A fixed, seeded random conv network to embed images when no pretrained feature network is at hand.

Distances on its features are NOT FID / KID: they are only comparable with each other (same seed,
same `feature_dim`) and are logged under their own names, `fd_randfeat` and `kd_randfeat`.
"""

from __future__ import annotations

import torch
from torch import nn


class RandomFeatureNet(nn.Module):
    """Four stride-2 3×3 convs with ReLU, then global average pooling to `feature_dim` features.

    Weights are He-normal draws from a local `torch.Generator` seeded with `seed`, so two instances
    with the same seed are identical on any machine and the global RNG is left untouched. The net
    is frozen (eval mode, no gradients). Fréchet / kernel distances on these features are NOT FID
    or KID — name them `fd_randfeat`, `kd_randfeat` — and compare them only across runs that used
    the same seed and `feature_dim`.
    """

    def __init__(self, seed: int = 0, feature_dim: int = 256, in_channels: int = 3):
        super().__init__()
        self.seed = seed
        self.feature_dim = feature_dim
        widths = [in_channels, feature_dim // 8, feature_dim // 4, feature_dim // 2, feature_dim]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.body:
                if isinstance(conv, nn.Conv2d):
                    fan_in = conv.weight[0].numel()
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """`(N, C, H, W)` images in [-1, 1] -> `(N, feature_dim)` float32 features on the CPU."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise ValueError(
                f"images must lie in [-1, 1], got [{images.min().item():.3f}, {images.max().item():.3f}]"
            )
        device = next(self.parameters()).device
        out = [self(batch.to(device, torch.float32)).cpu() for batch in images.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)
