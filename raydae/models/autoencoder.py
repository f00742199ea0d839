"""Convolutional encoder and decoder, VQGAN/LDM style without attention so they stay fast on CPUs.

Encoder: conv_in -> per level `num_res_blocks` ResBlocks (+ a stride-2 conv between levels) -> one
middle ResBlock -> GroupNorm/SiLU/conv_out. The decoder mirrors it with nearest-upsample + conv.

The decoder's capacity is set by a `DecoderConfig` (width, blocks, dropout): the DAE's auxiliary
decoder is this same class made weaker through those knobs, not a different architecture.
"""

from __future__ import annotations

from torch import Tensor, nn

from raydae.config import AutoencoderConfig, DecoderConfig
from raydae.models.kl import sign_scramble


# ----------------------------------------------------------------------------------- helpers
def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 8 that divides `channels` (8 for rounded widths)."""
    groups = max(g for g in range(1, 9) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to a multiple of 8 (at least 8), so GroupNorm(8) always fits."""
    return max(8, int(round(channels * width / 8)) * 8)


def latent_shape(ae_cfg: AutoencoderConfig, image_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the latent of one square image; same for both bottlenecks."""
    side = image_size // ae_cfg.downsample_factor
    return (ae_cfg.latent_channels, side, side)


def encoder_out_channels(ae_cfg: AutoencoderConfig) -> int:
    """KL needs a mean and a log-variance per latent channel; VQ codes have `latent_channels` dims."""
    return 2 * ae_cfg.latent_channels if ae_cfg.bottleneck == "kl" else ae_cfg.latent_channels


# ------------------------------------------------------------------------------ core blocks
class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> Dropout -> conv3x3, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 conv3x3: halves height and width (inputs must have even sides)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (no transposed conv: avoids checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------- encoder
class Encoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> (B, out_channels, H/f, W/f), f = ae_cfg.downsample_factor.

    out_channels is 2 * latent_channels for the KL bottleneck (mean, logvar) and latent_channels
    for VQ. Pass `out_channels` to override.
    """

    def __init__(self, ae_cfg: AutoencoderConfig, in_channels: int = 3, out_channels: int | None = None):
        super().__init__()
        out_channels = encoder_out_channels(ae_cfg) if out_channels is None else out_channels
        widths = [ae_cfg.base_channels * m for m in ae_cfg.channel_mults]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(ae_cfg.num_res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(ch, ch)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------- decoder
class Decoder(nn.Module):
    """Latents (B, latent_channels, H/f, W/f) -> images (B, 3, H, W); no tanh, a plain conv out.

    `dec_cfg` sets the capacity: `width` scales every channel count of the autoencoder (rounded to
    a multiple of 8), `num_res_blocks` per level, `dropout` inside every ResBlock.
    """

    def __init__(self, ae_cfg: AutoencoderConfig, dec_cfg: DecoderConfig, out_channels: int = 3):
        super().__init__()
        widths = [scaled_channels(ae_cfg.base_channels * m, dec_cfg.width) for m in ae_cfg.channel_mults]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(ae_cfg.latent_channels, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch, dec_cfg.dropout)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(dec_cfg.num_res_blocks):
                layers.append(ResBlock(ch, widths[level], dec_cfg.dropout))
                ch = widths[level]
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.unscramble = ae_cfg.sign_scramble  # undo the bottleneck's sign pattern (its own inverse)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        if self.unscramble:
            z = sign_scramble(z)
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
