"""Gaussian diffusion maths for latent generative models: noise schedules, the training loss, DDIM sampling.

Imports nothing from `raydae.models`: every function takes a `model_fn(x_t, t, **model_kwargs)` that
returns the model's prediction (eps or v, same shape as x_t). Classifier-free guidance is the caller's
choice of model_fn, e.g. `lambda x, t, y: dit.forward_with_cfg(x, t, y, scale)`.

Notation: ab = alphas_cumprod[t] ("alpha bar"), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.
- eps-prediction (DDPM): the model predicts eps.
- v-prediction (Salimans & Ho 2022): the model predicts v = sqrt(ab) eps - sqrt(1 - ab) x0, which
  stays well scaled at both ends of the schedule, where eps-prediction's x0 estimate blows up.

Schedules are built and kept in float64 and cast to the data's dtype at use: 1 - ab near t = 0 is ~1e-4,
where float32 cumulative products would already lose digits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

ModelFn = Callable[..., Tensor]

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's 1e-4 -> 0.02 over 1000 steps; scaled by 1000/T so other T cover the same noise range."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021): ab(t) = cos^2((t/T + s) / (1 + s) * pi/2); betas clipped at 0.999 so the
    last step does not divide by ab = 0."""

    def alpha_bar(step: float) -> float:
        return math.cos((step / num_timesteps + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


class GaussianDiffusion:
    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", prediction: str = "eps"):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.prediction = prediction
        self.betas = linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64, on the CPU
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, schedule={self.schedule!r}, "
            f"prediction={self.prediction!r})"
        )

    @staticmethod
    def _extract(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t] as (B, 1, 1, ...) in like's dtype and device, broadcastable against like."""
        out = values.to(t.device)[t.long()].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------ forward process and targets

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(ab) x0, (1 - ab) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * x0 + self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model is trained to predict: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
        if self.prediction == "eps":
            return noise
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * noise - self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * x0

    def predict_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Turn a prediction of either kind into (x0, eps) estimates."""
        sqrt_ab = self._extract(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_one_minus_ab = self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "eps":
            eps = model_output
            return (x_t - sqrt_one_minus_ab * eps) / sqrt_ab, eps
        # From x_t = a x0 + s eps and v = a eps - s x0 with a^2 + s^2 = 1.
        v = model_output
        return sqrt_ab * x_t - sqrt_one_minus_ab * v, sqrt_one_minus_ab * x_t + sqrt_ab * v

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in [0, T), drawn on the generator's device and moved to `device`."""
        draw_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device).to(device)

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Scalar MSE between model_fn(x_t, t) and the eps or v target, t uniform over [0, T).

        `noise` and `t` default to fresh draws (from `generator` if given); pass them to fix the batch.
        The MSE is taken in float32 so a bf16 autocast forward does not round the loss.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            draw_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, t, **(model_kwargs or {}))
        return F.mse_loss(model_output.float(), self.target(x0, t, noise).float())

    # ------------------------------------------------------------------ DDIM sampling

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced over [0, T-1], descending. Includes T-1, so sampling starts from
        (nearly) pure noise rather than from the partly noised t = T - T/steps of DDIM's original spacing."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps}], got {steps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        spaced = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()
        return spaced.flip(0).tolist()

    @torch.no_grad()
    def ddim_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        steps: int = 50,
        eta: float = 0.0,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        clip_x0: float | None = None,
    ) -> Tensor:
        """DDIM (Song et al. 2021) from pure noise to x0 estimates of `shape`, in float32.

        eta = 0 is deterministic given the initial noise; eta = 1 matches DDPM's posterior variance.
        All randomness (the initial noise and, for eta > 0, each step's noise) comes from `generator`,
        drawn on the generator's device and then moved to `device`, so a fixed CPU generator gives the
        same noise on any device. `clip_x0` clamps the x0 estimate to [-clip_x0, clip_x0] at every step
        (useful for pixels; latents are usually left unclipped). Put the model in eval() first.
        """
        model_kwargs = model_kwargs or {}
        draw_device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device) if device is not None else draw_device

        def noise_like() -> Tensor:
            return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)

        x = noise_like()
        timesteps = self.ddim_timesteps(steps)
        for i, step in enumerate(timesteps):
            prev_step = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            ab = self.alphas_cumprod[step].item()
            ab_prev = self.alphas_cumprod[prev_step].item() if prev_step >= 0 else 1.0  # t = -1 is clean data

            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            model_output = model_fn(x, t, **model_kwargs).float()
            x0, eps = self.predict_x0_eps(model_output, x, t)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)  # keep eps consistent with the clipped x0

            sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * noise_like()
        return x
