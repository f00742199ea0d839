"""Models: encoder, decoders, bottlenecks (KL / VQ) and the PatchGAN discriminator.

Plain PyTorch; built from the config tree so a checkpoint's config rebuilds them alone.
"""

from __future__ import annotations

from torch import nn

from raydae.config import AutoencoderConfig, DecoderConfig, DiscriminatorConfig
from raydae.models.autoencoder import Decoder, Encoder, ResBlock, encoder_out_channels, latent_shape
from raydae.models.bottleneck import BottleneckOutput
from raydae.models.discriminator import NLayerDiscriminator
from raydae.models.kl import DiagonalGaussianBottleneck
from raydae.models.vq import VectorQuantizer

__all__ = [
    "BottleneckOutput",
    "Decoder",
    "DiagonalGaussianBottleneck",
    "Encoder",
    "NLayerDiscriminator",
    "ResBlock",
    "VectorQuantizer",
    "build_bottleneck",
    "build_decoder",
    "build_discriminator",
    "build_encoder",
    "count_parameters",
    "encoder_out_channels",
    "latent_shape",
]


def build_encoder(ae_cfg: AutoencoderConfig) -> Encoder:
    return Encoder(ae_cfg)


def build_bottleneck(ae_cfg: AutoencoderConfig) -> DiagonalGaussianBottleneck | VectorQuantizer:
    if ae_cfg.bottleneck == "kl":
        return DiagonalGaussianBottleneck(ae_cfg.latent_channels, ae_cfg.kl.weight, ae_cfg.sign_scramble)
    if ae_cfg.bottleneck == "vq":
        vq = ae_cfg.vq
        return VectorQuantizer(
            codebook_size=vq.codebook_size,
            dim=ae_cfg.latent_channels,
            commitment_weight=vq.commitment_weight,
            ema=vq.ema,
            ema_decay=vq.ema_decay,
            l2_normalize=vq.l2_normalize,
            restart_dead_codes=vq.restart_dead_codes,
            dead_code_threshold=vq.dead_code_threshold,
        )
    raise ValueError(f"unknown bottleneck {ae_cfg.bottleneck!r}; expected kl or vq")


def build_decoder(ae_cfg: AutoencoderConfig, dec_cfg: DecoderConfig) -> Decoder:
    """`build_decoder(ae, ae.decoder)` for the final decoder, `(ae, ae.aux_decoder)` for the auxiliary one."""
    return Decoder(ae_cfg, dec_cfg)


def build_discriminator(disc_cfg: DiscriminatorConfig, in_channels: int = 3) -> NLayerDiscriminator:
    return NLayerDiscriminator(in_channels, disc_cfg.base_channels, disc_cfg.num_layers)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# The VQGAN's autoregressive prior over code indices (stage 2 of the VQ pipeline).
from raydae.models.prior import PRIOR_MODELS, CodePrior, build_prior, filter_logits  # noqa: E402

__all__ += ["PRIOR_MODELS", "CodePrior", "build_prior", "filter_logits"]


# Diffusion Transformer over latents (the diffusion maths lives apart, in raydae/diffusion.py).
from raydae.models.dit import DIT_MODELS, DiT, build_dit  # noqa: E402

__all__ += ["DIT_MODELS", "DiT", "build_dit"]
