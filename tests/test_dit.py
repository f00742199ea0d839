"""DiT (shapes, adaLN-Zero, CFG, label dropout), diffusion maths (schedules, targets, DDIM) and EMA.

Plain PyTorch, CPU, tiny sizes only: the paper's sizes are checked in the registry without being built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raydae.diffusion import GaussianDiffusion
from raydae.ema import ExponentialMovingAverage, ema_copy, ema_update, warmed_up_decay
from raydae.errors import UserError
from raydae.models.dit import DIT_MODELS, DiT, build_dit

LATENT_CHANNELS, LATENT_SIZE = 4, 8


def latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=generator)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every weight (zero-init ones included) so the model's output depends on its inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model


# ------------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("name", ["DiT-T/1", "DiT-T/2", "DiT-T/4", "DiT-XS/2"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_dit_output_shape_equals_input_shape(name, num_classes):
    model = build_dit(name, LATENT_SIZE, LATENT_CHANNELS, num_classes=num_classes).eval()
    x = latents(3)
    y = torch.tensor([0, 5, 9]) if num_classes else None
    out = model(x, torch.tensor([0, 500, 999]), y)
    assert out.shape == x.shape
    assert model.pos_embed.shape == (1, (LATENT_SIZE // model.patch_size) ** 2, model.hidden_size)


def test_dit_non_square_latents():
    model = DiT(input_size=(4, 8), patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2)
    x = torch.randn(2, 3, 4, 8)
    assert randomize_(model)(x, torch.tensor([1, 2])).shape == x.shape
    with pytest.raises(ValueError, match="built for latents"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_registry_has_paper_family_and_tiny_sizes(monkeypatch):
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name in ("DiT-T/1", "DiT-T/2", "DiT-XS/2"):
        assert name in DIT_MODELS
    # The big sizes are not built (DiT-XL/2 is 675M parameters): the factories' arguments are read by
    # standing a recorder in for the DiT class they call.
    monkeypatch.setattr("raydae.models.dit.DiT", lambda **kwargs: kwargs)
    for size, (depth, hidden, heads) in sizes.items():
        for patch in (2, 4, 8):
            kwargs = DIT_MODELS[f"DiT-{size}/{patch}"](input_size=32, in_channels=4)
            assert (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"]) == (depth, hidden, heads)
            assert kwargs["patch_size"] == patch and kwargs.get("mlp_ratio", 4.0) == 4.0


def test_build_dit_errors_name_the_fix():
    with pytest.raises(UserError, match="DiT-XL/2") as err:
        build_dit("DiT-Huge/2", LATENT_SIZE, LATENT_CHANNELS)
    assert "DiT-T/2" in str(err.value) and "DiT-Huge/2" in str(err.value)
    with pytest.raises(UserError, match="not divisible by patch size 4"):
        build_dit("DiT-T/4", 6, LATENT_CHANNELS)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_adaln_zero_output_is_exactly_zero_at_init(num_classes):
    model = build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=num_classes)
    y = torch.tensor([3, 7]) if num_classes else None
    out = model(latents(2), torch.tensor([10, 900]), y)
    assert torch.count_nonzero(out) == 0
    # ...while the gradient is not zero, so training can start.
    model(latents(2), torch.tensor([10, 900]), y).mul(latents(2, seed=1)).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_cfg_shape_and_scale_one_is_conditional():
    model = randomize_(build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=10)).eval()
    x, t, y = latents(3), torch.tensor([5, 250, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        guided_1 = model.forward_with_cfg(x, t, y, 1.0)
        guided_4 = model.forward_with_cfg(x, t, y, 4.0)
    assert guided_4.shape == x.shape
    torch.testing.assert_close(guided_1, cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(guided_4, uncond + 4.0 * (cond - uncond), rtol=0, atol=1e-4)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the null class is a different condition


def test_cfg_needs_a_conditional_model():
    model = build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=0)
    with pytest.raises(ValueError, match="class-conditional"):
        model.forward_with_cfg(latents(1), torch.tensor([1]), torch.tensor([0]), 2.0)


def test_label_dropout_only_in_training_mode():
    model = build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=10, class_dropout_prob=1.0)
    labels = torch.arange(10)
    embedder = model.y_embedder
    model.train()
    assert torch.equal(embedder.token_drop(labels), torch.full_like(labels, 10))  # every label dropped
    model.eval()
    assert torch.equal(embedder.token_drop(labels), labels)  # never in eval
    forced = torch.tensor([1, 0] * 5)
    expected = torch.where(forced.bool(), torch.full_like(labels, 10), labels)
    assert torch.equal(embedder.token_drop(labels, forced), expected)  # forced drops in any mode
    model.train()
    assert torch.equal(embedder.token_drop(labels, forced), expected)  # and they replace the random draw

    half = build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=10, class_dropout_prob=0.5).train()
    torch.manual_seed(0)
    dropped = (half.y_embedder.token_drop(torch.zeros(1000, dtype=torch.long)) == 10).float().mean()
    assert 0.4 < dropped < 0.6


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_dit_overfits_a_fixed_batch(prediction):
    """30 Adam steps on one fixed batch (latents, noise, timesteps) cut the loss by more than 10x
    (about 70-100x measured; ~0.3 s per case on an idle 2-core CPU)."""
    torch.manual_seed(0)
    model = build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS)
    diffusion = GaussianDiffusion(num_timesteps=100, prediction=prediction)
    x0 = latents(4)
    noise, t = torch.randn_like(x0), torch.tensor([10, 30, 60, 90])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        initial = diffusion.training_loss(model, x0, noise=noise, t=t).item()
    for _ in range(30):
        loss = diffusion.training_loss(model, x0, noise=noise, t=t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = diffusion.training_loss(model, x0, noise=noise, t=t).item()
    assert 0.5 < initial < 2.0  # zero output at init: the loss is the target's mean square, about 1
    assert final < initial / 10, (initial, final)


def test_conditional_training_loss_with_label_kwargs():
    model = randomize_(build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=10))
    diffusion = GaussianDiffusion(num_timesteps=50)
    loss = diffusion.training_loss(model, latents(2), model_kwargs={"y": torch.tensor([1, 2])},
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.y_embedder.embedding_table.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- diffusion maths


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1000, 50])
def test_schedules_are_monotone_in_open_unit_interval(schedule, num_timesteps):
    diffusion = GaussianDiffusion(num_timesteps=num_timesteps, schedule=schedule)
    betas, alphas_cumprod = diffusion.betas, diffusion.alphas_cumprod
    assert betas.dtype == alphas_cumprod.dtype == torch.float64
    assert betas.shape == alphas_cumprod.shape == (num_timesteps,)
    assert bool((betas > 0).all() and (betas <= 0.999).all())
    assert bool((betas[1:] >= betas[:-1]).all())
    assert bool((alphas_cumprod > 0).all() and (alphas_cumprod < 1).all())
    assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all())


def test_linear_schedule_endpoints():
    betas = GaussianDiffusion(1000, "linear").betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert GaussianDiffusion(100, "linear").betas[-1].item() == pytest.approx(0.2)  # scaled by 1000/T


def test_bad_diffusion_settings_raise():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_q_sample_and_predict_x0_eps_round_trip(prediction):
    diffusion = GaussianDiffusion(num_timesteps=1000, schedule="cosine", prediction=prediction)
    x0, noise = latents(4, seed=1).double(), latents(4, seed=2).double()
    t = torch.tensor([0, 10, 500, 990])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.target(x0, t, noise)
    x0_hat, eps_hat = diffusion.predict_x0_eps(target, x_t, t)  # a perfect model's output
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-8)


def test_v_target_formula():
    diffusion = GaussianDiffusion(num_timesteps=100, prediction="v")
    x0, noise, t = latents(2, seed=1), latents(2, seed=2), torch.tensor([3, 70])
    ab = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.target(x0, t, noise), ab.sqrt() * noise - (1 - ab).sqrt() * x0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_mse_against_the_target(prediction):
    diffusion = GaussianDiffusion(num_timesteps=100, prediction=prediction)
    x0, noise, t = latents(2, seed=1), latents(2, seed=2), torch.tensor([5, 80])
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    loss = diffusion.training_loss(zero_model, x0, noise=noise, t=t)
    torch.testing.assert_close(loss, diffusion.target(x0, t, noise).pow(2).mean())
    # Same generator seed, same draws of t and noise, same loss.
    model = randomize_(build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS))
    a = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(3))
    b = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_ddim_timesteps_are_evenly_spaced_and_descending():
    diffusion = GaussianDiffusion(num_timesteps=1000)
    assert diffusion.ddim_timesteps(5) == [999, 749, 500, 250, 0]
    assert diffusion.ddim_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        diffusion.ddim_timesteps(1001)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_same_seed_same_samples(eta):
    model = randomize_(build_dit("DiT-T/2", LATENT_SIZE, LATENT_CHANNELS, num_classes=10)).eval()
    diffusion = GaussianDiffusion(num_timesteps=100, prediction="v")
    shape = (2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    y = torch.tensor([1, 2])

    def model_fn(x, t, y):
        return model.forward_with_cfg(x, t, y, 2.0)

    def sample(seed):
        return diffusion.ddim_sample(model_fn, shape, steps=4, eta=eta, model_kwargs={"y": y},
                                     generator=torch.Generator().manual_seed(seed))  # fmt: skip

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == shape and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_oracle_recovers_a_point_mass(prediction, eta):
    """If all data is one point x*, the exact model output is known in closed form; DDIM must land on x*."""
    diffusion = GaussianDiffusion(num_timesteps=1000, schedule="linear", prediction=prediction)
    x_star = latents(1, seed=5)

    def oracle(x_t, t):
        ab = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return diffusion.target(x_star.expand_as(x_t), t, eps)

    sample = diffusion.ddim_sample(oracle, (3, *x_star.shape[1:]), steps=10, eta=eta,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(sample, x_star.expand_as(sample), rtol=0, atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_a_gaussian_oracle_follows_the_hand_computed_steps(prediction):
    """Data N(0, s^2): the exact denoiser is linear, x0 = c x_t with c = sqrt(ab) s^2 / (ab s^2 + 1 - ab), so
    each DDIM step (eta 0) from t to t' multiplies x by (sqrt(ab' ab) s^2 + sqrt((1 - ab')(1 - ab))) /
    (ab s^2 + 1 - ab). Three steps over T = 1000 are t = 999, 500, 0, then clean data (ab' = 1): a wrong
    spacing, index or last step gives another factor (a point mass, above, lands on x* whatever they are)."""
    diffusion = GaussianDiffusion(num_timesteps=1000, schedule="linear", prediction=prediction)
    var = 0.25
    ab_of = diffusion.alphas_cumprod

    def oracle(x_t, t):
        ab = ab_of[t].float().view(-1, 1, 1, 1)
        x0 = ab.sqrt() * var / (ab * var + 1 - ab) * x_t
        return diffusion.target(x0, t, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt())

    shape = (2, 1, 4, 4)
    sample = diffusion.ddim_sample(oracle, shape, steps=3, generator=torch.Generator().manual_seed(0))
    factor = 1.0
    for t, t_next in ((999, 500), (500, 0), (0, None)):
        ab, ab_next = ab_of[t].item(), (ab_of[t_next].item() if t_next is not None else 1.0)
        factor *= ((ab_next * ab) ** 0.5 * var + ((1 - ab_next) * (1 - ab)) ** 0.5) / (ab * var + 1 - ab)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, noise * factor, rtol=1e-4, atol=1e-5)


def test_ddim_clip_x0_bounds_the_sample():
    diffusion = GaussianDiffusion(num_timesteps=100)
    far_away = lambda x, t: -10 * torch.ones_like(x)  # noqa: E731  an eps that pushes x0 far out
    sample = diffusion.ddim_sample(far_away, (2, 1, 4, 4), steps=5, generator=torch.Generator().manual_seed(0),
                                   clip_x0=1.0)  # fmt: skip
    assert sample.abs().max() <= 1.0 + 1e-6


# ------------------------------------------------------------------------------- EMA


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_ema_update_matches_the_formula_exactly():
    torch.manual_seed(0)
    model = Toy()
    ema_model = ema_copy(model)
    assert not any(p.requires_grad for p in ema_model.parameters()) and not ema_model.training
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
        model.norm.running_mean.fill_(3.0)
    before = copy.deepcopy(ema_model.state_dict())
    decay = 0.9
    ema_update(ema_model, model, decay)
    for name, param in model.named_parameters():
        expected = decay * before[name] + (1 - decay) * param.detach()
        assert torch.equal(dict(ema_model.named_parameters())[name], expected), name
    assert torch.equal(ema_model.norm.running_mean, torch.full((2,), 3.0))  # buffers copied, not averaged
    assert all(p.requires_grad for p in model.parameters())  # the live model is untouched


def test_ema_of_a_module_with_buffers_only_copies_them():
    model = nn.BatchNorm1d(2, affine=False)
    ema_model = ema_copy(model)
    model.running_mean.fill_(3.0)
    ema_update(ema_model, model, 0.9)
    assert torch.equal(ema_model.running_mean, torch.full((2,), 3.0))


def test_ema_decay_zero_copies_and_one_keeps():
    torch.manual_seed(0)
    model = Toy()
    ema = ExponentialMovingAverage(model, decay=0.999)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(2).add_(1)
    kept = copy.deepcopy(ema.state_dict())
    ema.update(model, decay=1.0)
    assert all(torch.equal(ema.state_dict()[k], kept[k]) for k in dict(model.named_parameters()))
    ema.update(model, decay=0.0)
    for name, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[name], value), name


def test_warmed_up_ema_forgets_the_random_initial_weights():
    # A constant 0.999 keeps 0.999 ** 2000 = 13.5 % of the initial weights after 2 000 steps.
    torch.manual_seed(0)
    model = Toy()
    initial = ema_copy(model)
    constant, warmed = ema_copy(model), ema_copy(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(5.0)  # the trained weights, far from the initial ones
    for step in range(2000):
        ema_update(constant, model, 0.999)
        ema_update(warmed, model, warmed_up_decay(0.999, step))
    init_share = {}
    for name, ema_model in (("constant", constant), ("warmed", warmed)):
        weight = dict(ema_model.named_parameters())["linear.weight"]
        start, end = dict(initial.named_parameters())["linear.weight"], model.linear.weight
        init_share[name] = ((end - weight) / (end - start)).mean().item()
    assert init_share["constant"] == pytest.approx(0.999 ** 2000, rel=1e-3)
    assert init_share["warmed"] < 1e-3
    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1) and warmed_up_decay(0.999, 10**6) == 0.999


def test_ema_rejects_mismatched_models():
    model = Toy()
    wrapped = nn.Sequential(model)  # stands in for DDP's "module." prefix
    with pytest.raises(ValueError, match=r"\.module"):
        ema_update(ema_copy(model), wrapped, 0.9)
