"""Generators trained on the frozen latents: a DiT on KL latents and an autoregressive prior on VQ codes.

Both read latents that `latents.py` wrote once (never images), keep the autoencoder's final decoder
frozen inside their checkpoint so samples can be decoded from the checkpoint alone, and share the
skeleton's interface with the autoencoder stages (`models`, `frozen`, `train_config`, `train_step`, ...).

`latent_facts` carries what the config does not: `latent_shape` [C, h, w], `num_classes` (label names of
the dataset) and, for DiT, `latent_std`, the measured standard deviation of the latents. DiT trains
on latents divided by it (Stable Diffusion's 0.18215 is the same idea as a fixed constant).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from raydae.config import Config
from raydae.diffusion import GaussianDiffusion
from raydae.ema import ema_copy, ema_update, warmed_up_decay
from raydae.errors import UserError
from raydae.models import build_bottleneck, build_decoder
from raydae.models.dit import build_dit
from raydae.models.prior import build_prior
from raydae.tasks.common import (evaluation_mode, make_grid, optimizer_step, parameter_counts, place_modules,
                                  set_learning_rate)


class GeneratorTask:
    """What the two generators share: the frozen decoder, optimiser, step, grid and parameter counts."""

    image_tag = "samples"
    progress_keys: tuple[str, ...] = ()

    def __init__(self, config: Config, latent_facts: dict):
        missing = {"latent_shape", "num_classes"} - set(latent_facts)
        if missing:
            raise ValueError(f"generator task needs latent facts {sorted(missing)}")
        self.config = config
        self.latent_facts = dict(latent_facts)
        self.train_config = config.generator_train
        self.latent_shape = tuple(latent_facts["latent_shape"])
        # The final decoder (and, for VQ, the codebook) turn generated latents into images.
        self.decoder = build_decoder(config.ae, config.ae.decoder)
        self.bottleneck = build_bottleneck(config.ae)
        self.models: dict[str, nn.Module] = {"decoder": self.decoder, "bottleneck": self.bottleneck}
        self.frozen = {"decoder", "bottleneck"}
        self.generator_module: nn.Module  # set by subclasses, the module that is trained
        self.trained_module: nn.Module | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def load_previous_stage(self, state: dict) -> None:
        """Take the final decoder and the bottleneck from the finished autoencoder checkpoint."""
        self.decoder.load_state_dict(state["models"]["decoder"])
        self.bottleneck.load_state_dict(state["models"]["bottleneck"])

    def prepare(self, device: torch.device, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        self.device = device
        place_modules(self.models, self.frozen, device)
        s = self.train_config
        # Only the training forward is compiled: checkpoints, the EMA and sampling use the plain modules, so
        # their state_dict names carry no `_orig_mod.` prefix.
        self.trained_module = wrap(self.generator_module)
        if s.compile:
            self.trained_module = torch.compile(self.trained_module)
        self.trained_module.train()
        self.optimizers = {
            "generator": torch.optim.AdamW(
                self.trained_module.parameters(), lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay,
                fused=device.type == "cuda",  # one kernel for the whole update instead of several per tensor
            )
        }

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.models)

    def optimise(self, loss: torch.Tensor, lr_scale: float) -> None:
        set_learning_rate(self.optimizers, lr_scale)
        optimizer_step(self.optimizers["generator"], loss, self.trained_module.parameters(), self.train_config.grad_clip)

    def class_labels(self, n: int, device) -> torch.Tensor | None:
        if not self.conditional:
            return None
        return torch.arange(n, device=device) % self.latent_facts["num_classes"]

    def wrong_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Every label moved to the next class. The label gain, the held-out loss under these minus the loss
        under the right labels, says how much a class-conditional generator uses its labels: about 0 means it
        ignores them (its samples' class mix then follows the data, whatever class is asked for)."""
        return (labels + 1) % self.latent_facts["num_classes"]

    @torch.no_grad()
    def image_grid(self, batch: dict | None = None, max_images: int | None = None) -> torch.Tensor:
        """Samples decoded by the final decoder, for TensorBoard (a fixed seed, so grids are comparable)."""
        n = max_images or self.train_config.num_grid_samples
        images = self.sample(n, seed=0)
        return make_grid(images, nrow=min(n, 8))

    def sample(self, n: int, seed: int, **kwargs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ DiT
class DiTTask(GeneratorTask):
    batch_dtypes = {"mean": torch.float32, "logvar": torch.float32, "label": torch.int64}
    progress_keys = ("loss/diffusion",)

    def __init__(self, config: Config, latent_facts: dict):
        super().__init__(config, latent_facts)
        if "latent_std" not in latent_facts:
            raise ValueError("DiT task needs latent_facts['latent_std'] (measured when the latents were written)")
        dit_cfg = config.dit
        self.conditional = dit_cfg.class_conditional
        channels, height, width = self.latent_shape
        if height != width:
            raise UserError(f"DiT needs square latents, got {height}x{width}")
        self.dit = build_dit(
            dit_cfg.model, input_size=height, in_channels=channels,
            num_classes=latent_facts["num_classes"] if self.conditional else 0,
            class_dropout_prob=dit_cfg.class_dropout,
        )
        self.dit.activation_checkpointing = dit_cfg.activation_checkpointing
        self.dit_ema = ema_copy(self.dit)
        self.generator_module = self.dit
        self.models.update({"dit": self.dit, "dit_ema": self.dit_ema})
        self.frozen.add("dit_ema")  # written only by the EMA update
        self.diffusion = GaussianDiffusion(dit_cfg.num_timesteps, dit_cfg.schedule, dit_cfg.prediction)
        self.latent_std = float(latent_facts["latent_std"])

    def _latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = batch["mean"], batch["logvar"]
        if generator is None:
            noise = torch.randn_like(mean)
        else:  # drawn on the CPU generator, so evaluation noise is the same on any device
            noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return (z / self.latent_std).view(-1, *self.latent_shape)

    def train_step(self, batch: dict, step: int, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        x0 = self._latents(batch)
        kwargs = {"y": batch["label"]} if self.conditional else {}
        loss = self.diffusion.training_loss(self.trained_module, x0, model_kwargs=kwargs)
        self.optimise(loss, lr_scale)
        ema_update(self.dit_ema, self.dit, warmed_up_decay(self.config.dit.ema_decay, step))
        value = loss.detach()
        return {"loss/total": value, "loss/diffusion": value}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Diffusion loss of the EMA model on held-out latents, with fixed noise and timesteps; for a
        class-conditional model also its label gain (GeneratorTask.wrong_labels)."""
        generator = torch.Generator().manual_seed(1234)
        total, wrong, count = 0.0, 0.0, 0
        for batch in batches:
            x0 = self._latents(batch, generator)
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)

            def loss(**kwargs) -> float:
                return float(self.diffusion.training_loss(self.dit_ema, x0, model_kwargs=kwargs, noise=noise, t=t))

            if self.conditional:
                total += loss(y=batch["label"]) * x0.shape[0]
                wrong += loss(y=self.wrong_labels(batch["label"])) * x0.shape[0]
            else:
                total += loss() * x0.shape[0]
            count += x0.shape[0]
        if not count:
            return {}
        out = {"val/diffusion_loss": total / count, "val/latents": count}
        if self.conditional:
            out["val/label_gain"] = (wrong - total) / count
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int | None = None, cfg_scale: float | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """n images in [-1, 1] from the EMA DiT with DDIM, decoded by the final decoder."""
        device = next(self.dit_ema.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        steps = steps or self.config.dit.sample_steps
        scale = self.config.dit.cfg_scale if cfg_scale is None else cfg_scale
        y = labels.to(device) if labels is not None else self.class_labels(n, device)
        if y is None:
            model_fn, kwargs = (lambda x, t: self.dit_ema(x, t)), {}
        elif scale == 1.0:
            model_fn, kwargs = (lambda x, t, y: self.dit_ema(x, t, y)), {"y": y}
        else:
            model_fn, kwargs = (lambda x, t, y: self.dit_ema.forward_with_cfg(x, t, y, scale)), {"y": y}
        z = self.diffusion.ddim_sample(model_fn, (n, *self.latent_shape), steps=steps, model_kwargs=kwargs,
                                       generator=generator, device=device)
        return self.decoder(z * self.latent_std).clamp(-1, 1)


# ------------------------------------------------------------------------------------ VQ prior
class PriorTask(GeneratorTask):
    batch_dtypes = {"codes": torch.int64, "label": torch.int64}
    progress_keys = ("loss/cross_entropy",)

    def __init__(self, config: Config, latent_facts: dict):
        super().__init__(config, latent_facts)
        prior_cfg = config.prior
        self.conditional = prior_cfg.class_conditional
        _, height, width = self.latent_shape
        self.prior = build_prior(
            prior_cfg.model, vocab_size=config.ae.vq.codebook_size, seq_len=height * width,
            num_classes=latent_facts["num_classes"] if self.conditional else 0, dropout=prior_cfg.dropout,
        )
        self.generator_module = self.prior
        self.models["prior"] = self.prior

    def _cross_entropy(self, model: nn.Module, batch: dict) -> torch.Tensor:
        codes = batch["codes"]
        logits = model(codes, batch["label"] if self.conditional else None)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))

    def train_step(self, batch: dict, step: int, lr_scale: float = 1.0) -> dict[str, torch.Tensor]:
        loss = self._cross_entropy(self.trained_module, batch)
        self.optimise(loss, lr_scale)
        value = loss.detach()
        return {"loss/total": value, "loss/cross_entropy": value}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out cross-entropy in nats per code (and its perplexity); for a class-conditional prior also
        its label gain (GeneratorTask.wrong_labels), in nats per code."""
        total, wrong, count = 0.0, 0.0, 0
        with evaluation_mode(self.prior):
            for batch in batches:
                total += float(self._cross_entropy(self.prior, batch)) * batch["codes"].numel()
                if self.conditional:
                    mislabelled = {**batch, "label": self.wrong_labels(batch["label"])}
                    wrong += float(self._cross_entropy(self.prior, mislabelled)) * batch["codes"].numel()
                count += batch["codes"].numel()
        if not count:
            return {}
        nats = total / count
        out = {"val/cross_entropy": nats, "val/code_perplexity": float(torch.tensor(nats).exp())}
        if self.conditional:
            out["val/label_gain"] = (wrong - total) / count
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None, steps: int | None = None,
               cfg_scale: float | None = None) -> torch.Tensor:
        """n images in [-1, 1]: codes sampled with the key/value cache, decoded by the final decoder.
        (`steps` and `cfg_scale` are DiT's knobs; the prior has none and ignores them.)"""
        device = next(self.prior.parameters()).device
        p = self.config.prior
        y = labels.to(device) if labels is not None else self.class_labels(n, device)
        with evaluation_mode(self.prior):
            codes = self.prior.generate(n, y=y, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                        generator=torch.Generator().manual_seed(seed), device=device)
        _, height, width = self.latent_shape
        z = self.bottleneck.decode_indices(codes.view(n, height, width))
        return self.decoder(z).clamp(-1, 1)


def make_generator_task(config: Config, latent_facts: dict) -> GeneratorTask:
    if config.generator == "dit":
        return DiTTask(config, latent_facts)
    if config.generator == "vq_prior":
        return PriorTask(config, latent_facts)
    raise ValueError(f"config.generator={config.generator!r} trains no generator")
