"""The autoencoder stages of the Decoupled Autoencoder (and its joint-training baseline):
- `stage1`: encoder (+ bottleneck) + *auxiliary* decoder (the weaker one) trained together;
- `stage2`: encoder (+ bottleneck, by config) frozen from stage 1, the *final* decoder trained fresh;
- `joint`: the baseline, encoder + final decoder trained together.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from raydae.config import Config
from raydae.errors import UserError
from raydae.losses import (
    adaptive_gan_weight,
    build_lpips,
    draw_equivariance_step,
    equivariance_loss,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from raydae.models import (
    BottleneckOutput,
    DiagonalGaussianBottleneck,
    build_bottleneck,
    build_decoder,
    build_discriminator,
    build_encoder,
    latent_shape,
)
from raydae.pixels import model_input, unit_interval
from raydae.tasks.common import (evaluation_mode, make_grid, optimizer_step, parameter_counts, place_modules,
                                  set_learning_rate)

AUTOENCODER_STAGES = ("stage1", "stage2", "joint")


class Autoencoder(nn.Module):
    """Encoder -> bottleneck -> decoder as one module, so DDP sees one forward per step."""

    def __init__(self, encoder: nn.Module, bottleneck: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder

    def forward(self, images: torch.Tensor, sample: bool = True):
        out = encode_images(self.encoder, self.bottleneck, images, sample)
        return self.decoder(out.z), out


class DecoderOnFrozenLatents(nn.Module):
    """Stage 2's trained unit: the decoder alone; the frozen encoder runs outside autograd."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def encode_images(encoder: nn.Module, bottleneck: nn.Module, images: torch.Tensor,
                  sample: bool = False) -> BottleneckOutput:
    """Images in [-1, 1] -> latents: the bottleneck's output on the encoder's features (`z`, loss, stats and
    KL's posterior or VQ's code indices)."""
    return run_bottleneck(bottleneck, encoder(images), sample)


def run_bottleneck(bottleneck: nn.Module, h: torch.Tensor, sample: bool) -> BottleneckOutput:
    # The KL bottleneck samples during training and returns its mean for evaluation; VQ is deterministic.
    if isinstance(bottleneck, DiagonalGaussianBottleneck):
        return bottleneck(h, sample=sample)
    return bottleneck(h)


def latent_signature(config: Config) -> dict:
    """What stage 2 needs from a stage-1 encoder: the bottleneck kind and the latent shape."""
    ae = config.ae
    signature = {"bottleneck": ae.bottleneck, "latent_shape": list(latent_shape(ae, config.data.image_size))}
    if ae.bottleneck == "vq":
        signature["codebook_size"] = ae.vq.codebook_size
    return signature


def describe_signature(sig: dict) -> str:
    c, h, w = sig["latent_shape"]
    extra = f", {sig['codebook_size']} codes" if "codebook_size" in sig else ""
    return f"{sig['bottleneck']} latent {c}x{h}x{w}{extra}"


class AutoencoderTask:
    batch_dtypes = {"image": torch.uint8, "label": torch.int64}  # made model input on the device (model_input)
    progress_keys = ("loss/reconstruction",)
    image_tag = "inputs_vs_reconstructions"

    def __init__(self, config: Config, stage: str):
        if stage not in AUTOENCODER_STAGES:
            raise ValueError(f"unknown autoencoder stage {stage!r}")
        self.config = config
        self.stage = stage
        ae = config.ae
        decoder_cfg = ae.aux_decoder if stage == "stage1" else ae.decoder
        self.encoder = build_encoder(ae)
        self.bottleneck = build_bottleneck(ae)
        self.decoder = build_decoder(ae, decoder_cfg)
        disc = config.loss.discriminator
        self.discriminator = build_discriminator(disc) if disc.enabled else None
        self.lpips = build_lpips(config.loss)
        self.models: dict[str, nn.Module] = {
            "encoder": self.encoder,
            "bottleneck": self.bottleneck,
            "decoder": self.decoder,
        }
        if self.discriminator is not None:
            self.models["discriminator"] = self.discriminator
        self.frozen = self._frozen_names()
        self.train_config = config.train  # batch size, warm-up, cadence of logs/images/checkpoints
        self.trained_module: nn.Module | None = None
        self.trained_discriminator: nn.Module | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # ---------------------------------------------------------------------------- set-up
    def _frozen_names(self) -> set[str]:
        if self.stage != "stage2":
            return set()
        frozen = {"encoder"}
        if self.config.ae.bottleneck == "kl" or self.config.train.freeze_quantizer:
            frozen.add("bottleneck")
        return frozen

    def load_previous_stage(self, state: dict) -> None:
        """Stage 2 starts from stage 1's encoder (and bottleneck); optionally its decoder too."""
        self.encoder.load_state_dict(state["models"]["encoder"])
        self.bottleneck.load_state_dict(state["models"]["bottleneck"])
        if self.config.train.warm_start_decoder:
            aux = state["models"]["decoder"]
            mine = self.decoder.state_dict()
            if {k: v.shape for k, v in aux.items()} != {k: v.shape for k, v in mine.items()}:
                raise UserError(
                    "train.warm_start_decoder=true needs the auxiliary and final decoders to have the same "
                    "shape (ae.aux_decoder.width/num_res_blocks equal to ae.decoder's); set it to false"
                )
            self.decoder.load_state_dict(aux)

    def prepare(self, device: torch.device, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        """Move to `device`, freeze what this stage does not train, wrap the trained units (DDP)."""
        place_modules(self.models, self.frozen, device)
        if self.lpips is not None:
            self.lpips.to(device)
        # A trainable VQ codebook in stage 2 is refused when the config loads (config.validate).
        if self.stage == "stage2":
            self.trained_module = wrap(DecoderOnFrozenLatents(self.decoder))
        else:
            self.trained_module = wrap(Autoencoder(self.encoder, self.bottleneck, self.decoder))
        self.trained_module.train()
        if self.discriminator is not None:
            self.trained_discriminator = wrap(self.discriminator)
            self.trained_discriminator.train()
        train = self.config.train
        self.optimizers = {
            "autoencoder": torch.optim.Adam(
                [p for p in self.trained_module.parameters() if p.requires_grad],
                lr=train.lr,
                betas=tuple(train.betas),
                weight_decay=train.weight_decay,
            )
        }
        if self.trained_discriminator is not None:
            disc = self.config.loss.discriminator
            self.optimizers["discriminator"] = torch.optim.Adam(
                self.trained_discriminator.parameters(), lr=disc.lr or train.lr, betas=tuple(train.betas)
            )

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.models)

    # ---------------------------------------------------------------------------- training
    def encode_frozen(self, images: torch.Tensor, sample: bool):
        with torch.no_grad():
            return encode_images(self.encoder, self.bottleneck, images, sample)

    def reconstruct(self, images: torch.Tensor, sample: bool):
        """Training forward, through the (DDP-)wrapped unit: every rank must call it together."""
        if self.stage == "stage2":
            out = self.encode_frozen(images, sample)
            return self.trained_module(out.z), out
        return self.trained_module(images, sample=sample)

    def reconstruct_unwrapped(self, images: torch.Tensor):
        """Evaluation forward on the plain modules. Rank 0 evaluates alone, and a DDP forward there
        would wait forever for the other ranks' collectives."""
        out = encode_images(self.encoder, self.bottleneck, images)
        return self.decoder(out.z), out

    def train_step(self, batch: dict, step: int, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        images = model_input(batch["image"])
        train = self.config.train
        disc_cfg = self.config.loss.discriminator
        set_learning_rate(self.optimizers, lr_scale)

        recon, out = self.reconstruct(images, sample=True)
        rec_loss = reconstruction_loss(images, recon, self.config.loss.reconstruction)
        logs = {"loss/reconstruction": rec_loss.detach(), "loss/bottleneck": out.loss.detach()}
        # What the adversarial weight balances against: pixels and, when on, LPIPS (taming-transformers' nll)
        rec_terms = rec_loss
        if self.lpips is not None:
            perceptual = self.lpips(images, recon).mean()
            rec_terms = rec_terms + self.config.loss.lpips_weight * perceptual
            logs["loss/lpips"] = perceptual.detach()
        loss = rec_terms + out.loss
        equivariance = self.config.loss.equivariance
        if equivariance.weight > 0:
            # EQ-VAE through this stage's decoder (the auxiliary one in stage 1). Stage 2's latents are frozen,
            # so there it shapes only the final decoder: decode(T z) = T x is a property of the decoder too.
            transform, trains = draw_equivariance_step(equivariance, train.seed, step)
            # Measured on every step, trained on a share of them, so its logged mean is the term itself.
            with torch.set_grad_enabled(trains):
                # The plain decoder, outside DDP's forward: its weights get one summed gradient per backward,
                # as shared weights do, and every rank draws the same transform.
                eq_loss = equivariance_loss(self.decoder, out.z, images, transform, self.config.loss.reconstruction)
            if trains:
                loss = loss + equivariance.weight * eq_loss
            logs["loss/equivariance"] = eq_loss.detach()
        use_gan = self.trained_discriminator is not None and step >= disc_cfg.start_step
        if use_gan:
            g_loss = hinge_g_loss(self.trained_discriminator(recon))
            weight = disc_cfg.weight  # a float: a tensor made from it each step would be a copy to the GPU
            if disc_cfg.adaptive_weight:
                weight = weight * adaptive_gan_weight(rec_terms, g_loss, self.decoder.last_layer)
            loss = loss + weight * g_loss
            logs["loss/generator_adv"] = g_loss.detach()
            logs["gan_weight"] = torch.as_tensor(weight).detach()
        optimizer_step(self.optimizers["autoencoder"], loss, self.trained_module.parameters(), train.grad_clip)
        logs["loss/total"] = loss.detach()
        for key, value in out.stats.items():
            logs[f"bottleneck/{key}"] = value.detach()

        if use_gan:
            # One discriminator forward on real and fake together: DDP expects one forward per backward.
            logits = self.trained_discriminator(torch.cat([images, recon.detach()]))
            real, fake = logits.chunk(2)
            d_loss = hinge_d_loss(real, fake)
            optimizer_step(self.optimizers["discriminator"], d_loss)
            logs["loss/discriminator"] = d_loss.detach()
        return logs

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict], observe: Callable | None = None) -> dict[str, float]:
        """Reconstruction MSE, PSNR and SSIM (torchmetrics) on held-out images, in [0, 1] pixel units.

        `observe(images, reconstructions, bottleneck_output)`, when given, sees every batch (evaluation
        uses it to embed the reconstructions without decoding twice)."""
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        psnr = ssim = None
        squared_error, pixels, count = 0.0, 0, 0
        usage = None
        with evaluation_mode(*self.models.values()):
            for batch in batches:
                images = model_input(batch["image"])
                recon, out = self.reconstruct_unwrapped(images)
                if observe is not None:
                    observe(images, recon, out)
                real01 = unit_interval(images).float()
                fake01 = unit_interval(recon).float()
                if psnr is None:
                    # Rank 0 evaluates alone: torchmetrics must not gather from the other DDP ranks.
                    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(images.device)
                    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(images.device)
                psnr.update(fake01, real01)
                ssim.update(fake01, real01)
                squared_error += float(((fake01 - real01) ** 2).sum())
                pixels += real01.numel()
                count += images.shape[0]
                if out.indices is not None:
                    hits = torch.bincount(out.indices.flatten(), minlength=self.config.ae.vq.codebook_size)
                    usage = hits if usage is None else usage + hits
        if count == 0:
            return {}
        metrics = {"val/mse": squared_error / pixels, "val/psnr": float(psnr.compute()),
                   "val/ssim": float(ssim.compute()), "val/images": count}
        if usage is not None:
            probs = usage.float() / usage.sum()
            entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
            metrics["val/codebook_usage"] = float((usage > 0).float().mean())
            metrics["val/perplexity"] = float(entropy.exp())
        return metrics

    @torch.no_grad()
    def image_grid(self, batch: dict, max_images: int = 16) -> torch.Tensor:
        """Inputs (top row) beside reconstructions (bottom row), CHW in [0, 1] for TensorBoard."""
        images = model_input(batch["image"][:max_images])
        with evaluation_mode(*self.models.values()):
            recon, _ = self.reconstruct_unwrapped(images)
        return make_grid(torch.cat([images, recon]).float(), nrow=images.shape[0])
