"""The paper's distance between a latent distribution and the data, through a decoder class.

From the GAN objective, "Complexity Matters" (NeurIPS 2023) measures a latent distribution P_z
against the data P_x through a generator class G:

    d_G(P_z, P_x) = inf_{g in G} D(g#P_z, P_x),    D(P, Q) = sup_{f in F} E_Q f - E_P f,

with F a critic class of fixed capacity. Here G is whatever `make_decoder` builds (the caller's
decoder class and width) and F is `Critic`: a small conv net with spectral normalisation on every
layer, so each f is (approximately) 1-Lipschitz and D is a Wasserstein-1-style IPM, bounded by
W1 rather than free to grow. `estimate_latent_distance` approximates the inf and the sup by
finite training; docs/latent_distance.md says which way each error goes and how to read it.

Plain PyTorch, no Ray. Deterministic on the CPU for a seed: batch order comes from a local
`torch.Generator`, and module initialisation (which `make_decoder` does with the global RNG) runs
inside `torch.random.fork_rng`, so the caller's global RNG is left as it was.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


# ------------------------------------------------------------------------------------ critic
class Critic(nn.Module):
    """Images (N, C, H, W) -> one score per image; the fixed-capacity critic class F.

    Three stride-2 4×4 convs (widths c, 2c, 4c) with LeakyReLU(0.2), a mean over positions and a
    linear layer; spectral normalisation on every conv and the linear layer. LeakyReLU and the
    mean are 1-Lipschitz, so f is 1-Lipschitz in the L2 norm of the image *if* each layer's
    spectral norm is 1. It is only approximately: torch normalises a conv's reshaped
    (C_out, C_in·k·k) kernel by one power-iteration step per training forward, which is not
    exactly the conv's operator norm (see `raydae.eval.complexity.conv_spectral_norm`).
    No normalisation layers: they would break the per-layer bound.
    """

    def __init__(self, in_channels: int = 3, channels: int = 32):
        super().__init__()
        widths = [in_channels, channels, 2 * channels, 4 * channels]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Linear(widths[-1], 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images).mean(dim=(2, 3))).squeeze(1)


# ------------------------------------------------------------------------------------ result
@dataclasses.dataclass(frozen=True)
class LatentDistance:
    """What `estimate_latent_distance` measured. All critic values are mean f(real) − mean f(other).

    value: held-out estimate, mean f(x_val) − mean f(g(z_val)) with g and f trained on the
        training split only. The number to report.
    value_stderr: its standard error over the validation pairs, std(f(x_i) − f(g(z_i))) / sqrt(n)
        (the val split is a sample of pairs): sampling noise for this g and f, not the spread
        over seeds, which is larger.
    train_value: the same critic on the training split (above `value` by what f overfits, plus noise).
    real_vs_real: a fresh critic trained the same way between the two halves of x_train, scored on
        the two halves of x_val. 0 in expectation; its size is the noise of an *unpaired*
        comparison of equal distributions, larger than the noise of `value`, which is computed
        over pairs. `real_vs_real_train`: that critic on the halves it was trained on, i.e. how
        much a critic that fits sample noise can make `train_value` exceed the truth.
    paired_l2_val: mean ‖g(z_val) − x_val‖₂ per image, the L2 distance of the given pairs: an
        upper bound on W1(g#P_z, P_x) through the coupling the pairs define (only meaningful when
        z_val and x_val are paired).
    """

    value: float
    value_stderr: float
    train_value: float
    real_vs_real: float | None  # None when called with baseline=False
    real_vs_real_train: float | None
    paired_l2_val: float
    decoder_parameters: int
    critic_parameters: int
    decoder_steps: int
    critic_steps: int
    batch_size: int
    lr: float
    critic_lr: float
    reconstruction_weight: float
    critic_channels: int
    seed: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------- estimator
def estimate_latent_distance(
    make_decoder: Callable[[], nn.Module],
    z_train: Tensor,
    x_train: Tensor,
    z_val: Tensor,
    x_val: Tensor,
    decoder_steps: int = 300,
    critic_steps: int = 1000,
    batch_size: int = 32,
    lr: float = 5e-4,
    critic_lr: float = 2e-3,
    reconstruction_weight: float = 1.0,
    critic_channels: int = 32,
    seed: int = 0,
    baseline: bool = True,
    device: str | torch.device = "cpu",
) -> LatentDistance:
    """Estimate d_G(P_z, P_x) = inf_g sup_f E f(x) − E f(g(z)) for the decoder class `make_decoder`.

    1. **Search for g.** A fresh decoder `make_decoder()` is trained from scratch for
       `decoder_steps` against a fresh `Critic` f₁, one critic step per decoder step (one decoder
       forward serves both), with the IPM losses: f₁ maximises mean f₁(x) − mean f₁(g(z)) on
       independent batches of x and z; g minimises −mean f₁(g(z)) + `reconstruction_weight` ·
       mean ‖g(z) − x‖₂ over the *paired* x. The decoder's lr decays to 0 on a cosine.
       The definition is unpaired, and the reported value never uses the pairs: the
       reconstruction term only steers the search for g (any g in the class is an admissible
       candidate for the inf). It has the critic's units, since mean ‖g(z) − x‖₂ ≥ W1(g#P_z, P_x)
       for the coupling the pairs define, and it makes the search work on budgets where the
       adversarial signal alone barely moves g. It favours latents informative about their own
       image; for unpaired latents set it to 0 (and give the search many more steps).
    2. **Measure D for that g.** g is frozen; a *fresh* critic f (same class, fresh init) is
       trained for `critic_steps` at `critic_lr` on the training split to maximise
       mean f(x) − mean f(g(z)).
    3. **Report on held-out data**: `value` = mean f(x_val) − mean f(g(z_val)), and beside it
       the same on the training split and a real-vs-real baseline (see `LatentDistance`). The
       baseline depends only on the images, the seed and the critic settings, not on the
       decoder or the latents; `baseline=False` skips it (about a quarter of the cost) when it was
       already computed for this seed.

    Finite training errs both ways: g is not the best of its class, so the value is too *high*
    for the inf; f is not the best critic, so it is too *low* for the sup. Compare values only
    when the critic, steps, batch size, learning rates, data and seeds are the same, and look at
    the spread over seeds (docs/latent_distance.md has it measured).

    Shapes: z_* (N, C, h, w) frozen latents, x_* (N, 3, H, W) real images in [-1, 1], with
    z_train[i] the latent of x_train[i] (pairs are used by the reconstruction term only).
    Adam with betas (0.5, 0.9) for decoder and critics, batches sampled with replacement.
    Cost: about a minute on two idle CPU cores for the `shapes` preset's decoder with the defaults.
    """
    _check_inputs(z_train, x_train, "train")
    _check_inputs(z_val, x_val, "val")
    if x_train.shape[0] < 4 or x_val.shape[0] < 4:
        raise ValueError("need at least 4 training and 4 validation pairs (the baseline splits each in halves)")
    if decoder_steps < 0 or critic_steps < 1 or batch_size < 1:
        raise ValueError(f"need decoder_steps >= 0, critic_steps >= 1, batch_size >= 1; got "
                         f"{decoder_steps}, {critic_steps}, {batch_size}")
    start = time.perf_counter()
    device = torch.device(device)
    z_train, x_train = z_train.to(device, torch.float32), x_train.to(device, torch.float32)
    z_val, x_val = z_val.to(device, torch.float32), x_val.to(device, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    new_critic = _seeded_factory(lambda: Critic(x_train.shape[1], critic_channels), generator, device)

    # 1. search for g: adversarial + paired reconstruction, from scratch
    decoder = _seeded_factory(make_decoder, generator, device)()
    decoder.train()
    critic = new_critic()
    decoder_opt = torch.optim.Adam(decoder.parameters(), lr=lr, betas=(0.5, 0.9))
    # Cosine decay to 0: the adversarial game keeps the last iterate moving, and a last iterate
    # caught mid-oscillation would add seed-to-seed spread that says nothing about the latents.
    decoder_schedule = torch.optim.lr_scheduler.LambdaLR(
        decoder_opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, decoder_steps)))
    )
    critic_opt = torch.optim.Adam(critic.parameters(), lr=critic_lr, betas=(0.5, 0.9))
    with torch.random.fork_rng(devices=[]):  # dropout inside the decoder draws from the global RNG
        torch.manual_seed(seed)
        for _ in range(decoder_steps):
            paired = _batch(x_train.shape[0], batch_size, generator, device)
            real = _batch(x_train.shape[0], batch_size, generator, device)
            fake = decoder(z_train[paired])

            critic.requires_grad_(True)
            critic_loss = critic(fake.detach()).mean() - critic(x_train[real]).mean()
            critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            critic_opt.step()

            critic.requires_grad_(False)  # the decoder step needs gradients through f, not for f
            decoder_loss = -critic(fake).mean()
            if reconstruction_weight:
                decoder_loss = decoder_loss + reconstruction_weight * _pair_l2(fake, x_train[paired]).mean()
            decoder_opt.zero_grad(set_to_none=True)
            decoder_loss.backward()
            decoder_opt.step()
            decoder_schedule.step()
    decoder.eval().requires_grad_(False)

    # 2. measure D for the frozen g with a fresh critic; 3. report on held-out data
    fake_train, fake_val = _apply(decoder, z_train, batch_size), _apply(decoder, z_val, batch_size)
    critic = _train_critic(new_critic(), x_train, fake_train, critic_steps, batch_size, critic_lr, generator, device)
    value, value_stderr = _paired_gap(critic, x_val, fake_val, batch_size)
    train_value = _mean_gap(critic, x_train, fake_train, batch_size)

    # the baseline: the same critic training between two halves of real data
    real_vs_real = real_vs_real_train = None
    if baseline:
        half_train, half_val = x_train.shape[0] // 2, x_val.shape[0] // 2
        baseline_critic = _train_critic(new_critic(), x_train[:half_train], x_train[half_train:], critic_steps,
                                     batch_size, critic_lr, generator, device)
        real_vs_real = _mean_gap(baseline_critic, x_val[:half_val], x_val[half_val:], batch_size)
        real_vs_real_train = _mean_gap(baseline_critic, x_train[:half_train], x_train[half_train:], batch_size)

    return LatentDistance(
        value=value,
        value_stderr=value_stderr,
        train_value=train_value,
        real_vs_real=real_vs_real,
        real_vs_real_train=real_vs_real_train,
        paired_l2_val=float(_pair_l2(fake_val, x_val).mean()),
        decoder_parameters=sum(p.numel() for p in decoder.parameters()),
        critic_parameters=sum(p.numel() for p in critic.parameters()),
        decoder_steps=decoder_steps,
        critic_steps=critic_steps,
        batch_size=batch_size,
        lr=lr,
        critic_lr=critic_lr,
        reconstruction_weight=reconstruction_weight,
        critic_channels=critic_channels,
        seed=seed,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------- helpers
def _check_inputs(z: Tensor, x: Tensor, split: str) -> None:
    if z.ndim != 4 or x.ndim != 4:
        raise ValueError(f"{split}: latents and images must be (N, C, H, W), got {tuple(z.shape)} and {tuple(x.shape)}")
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"{split}: {z.shape[0]} latents for {x.shape[0]} images; they must be pairs")
    if not x.is_floating_point() or (x.numel() and (x.min() < -1.001 or x.max() > 1.001)):
        raise ValueError(f"{split}: images must be float in [-1, 1]")


def _seeded_factory(factory: Callable[[], nn.Module], generator: torch.Generator, device) -> Callable[[], nn.Module]:
    """Wrap `factory` so each call initialises from the next seed of `generator`, not the global RNG."""

    def build() -> nn.Module:
        module_seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed)
            return factory().to(device)

    return build


def _batch(n: int, batch_size: int, generator: torch.Generator, device) -> Tensor:
    return torch.randint(0, n, (batch_size,), generator=generator).to(device)


def _pair_l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).flatten(1).norm(dim=1)


@torch.no_grad()
def _apply(module: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
    return torch.cat([module(chunk) for chunk in inputs.split(batch_size)])


def _train_critic(critic: Critic, real: Tensor, other: Tensor, steps: int, batch_size: int, lr: float,
                  generator: torch.Generator, device) -> Critic:
    """Maximise mean f(real) − mean f(other) on independent batches; return f frozen, in eval mode."""
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    critic.train()
    for _ in range(steps):
        real_batch = real[_batch(real.shape[0], batch_size, generator, device)]
        other_batch = other[_batch(other.shape[0], batch_size, generator, device)]
        loss = critic(other_batch).mean() - critic(real_batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return critic.eval().requires_grad_(False)


def _mean_gap(critic: Critic, real: Tensor, other: Tensor, batch_size: int) -> float:
    """mean f(real) − mean f(other)."""
    return float(_apply(critic, real, batch_size).double().mean() - _apply(critic, other, batch_size).double().mean())


def _paired_gap(critic: Critic, real: Tensor, other: Tensor, batch_size: int) -> tuple[float, float]:
    """(mean of f(real_i) − f(other_i), its standard error) for paired rows."""
    gaps = _apply(critic, real, batch_size).double() - _apply(critic, other, batch_size).double()
    return float(gaps.mean()), float(gaps.std() / gaps.numel() ** 0.5)
