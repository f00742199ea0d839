"""Cheap latent measures (raydae.eval.latent_quality) and the report's rank correlation (raydae.stats). No Ray."""

import math

import numpy as np
import pytest
import torch

from raydae import losses
from raydae.eval.latent_quality import (
    KEYS,
    channel_statistics,
    equivariance_errors,
    high_frequency_energy,
    latent_quality,
    probe_generator_loss,
    radial_frequency,
)
from raydae.models.kl import sign_scramble
from raydae.stats import average_ranks, spearman, spearman_bootstrap


def smooth_latents(n=16, channels=4, height=16, width=16, seed=0):
    """Sums of the lowest spatial frequencies (<= 1/16 cycle per sample) with random phases and amplitudes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(height, dtype=torch.float64)[:, None] / height
    x = torch.arange(width, dtype=torch.float64)[None, :] / width
    z = torch.zeros(n, channels, height, width, dtype=torch.float64)
    for ky, kx in ((0, 1), (1, 0), (1, 1)):
        amplitude = torch.randn(n, channels, 1, 1, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(n, channels, 1, 1, generator=g, dtype=torch.float64)
        z += amplitude * torch.cos(2 * math.pi * (ky * y + kx * x) + phase)
    return z + 3.0  # an offset: the channel mean is removed before the spectrum


# ---------------------------------------------------------------- high-frequency energy

def test_high_frequency_energy_is_zero_for_constant_and_smooth_latents():
    assert high_frequency_energy(torch.full((4, 3, 8, 8), 2.5)) == 0.0
    assert high_frequency_energy(smooth_latents()) < 1e-12


def test_high_frequency_energy_of_white_noise_is_the_share_of_bins_above_the_cutoff():
    z = torch.randn(256, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    # Flat spectrum, DC removed: the share is the fraction of non-DC bins beyond half the Nyquist frequency.
    expected = (radial_frequency(16, 16) > 0.5).sum().item() / (16 * 16 - 1)
    assert expected > 0.75
    assert high_frequency_energy(z) == pytest.approx(expected, abs=0.02)


def test_high_frequency_energy_grows_with_added_noise():
    smooth = smooth_latents()
    noise = torch.randn(smooth.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shares = [high_frequency_energy(smooth + sigma * noise) for sigma in (0.0, 0.05, 0.2, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[0] < 1e-12 and shares[-1] > 0.6


def test_the_cutoff_is_in_units_of_the_nyquist_frequency():
    # Period 4 along width: 0.25 cycles per sample, half the Nyquist frequency; a checkerboard sits at √2 Nyquist.
    stripes = torch.cos(torch.arange(16.0) * math.pi / 2).expand(2, 3, 8, 16)
    assert high_frequency_energy(stripes, cutoff=0.45) == pytest.approx(1.0)
    assert high_frequency_energy(stripes, cutoff=0.55) == pytest.approx(0.0, abs=1e-12)
    checkerboard = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1).expand(2, 1, 8, 8)
    assert high_frequency_energy(checkerboard, cutoff=1.4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        high_frequency_energy(torch.zeros(3, 8, 8))


# ---------------------------------------------------------------- channel statistics

def test_channel_statistics_match_numpy_on_known_distributions():
    rng = np.random.default_rng(3)
    shape = (64, 16, 16)
    channels = [2.0 * rng.standard_normal(shape),  # std 2, excess kurtosis 0
                rng.uniform(-1, 1, shape),  # std 1/√3, excess kurtosis -1.2
                rng.laplace(0, 1, shape),  # std √2, excess kurtosis 3
                np.full(shape, 0.7)]  # a dead channel
    z = torch.from_numpy(np.stack(channels, axis=1).astype(np.float32))
    stats = channel_statistics(z)

    for c, values in enumerate(channels[:3]):
        values = values.astype(np.float32).astype(np.float64).ravel()
        centred = values - values.mean()
        assert stats["std"][c] == pytest.approx(np.std(values), rel=1e-6)
        assert stats["kurtosis"][c] == pytest.approx(np.mean(centred**4) / np.mean(centred**2) ** 2 - 3, abs=1e-6)
    assert stats["std"][:3] == pytest.approx([2.0, 1 / math.sqrt(3), math.sqrt(2)], rel=0.03)
    # Sample kurtosis is noisy with heavy tails (sd ~0.04, 0.02, 0.4 here): about 3 sd each.
    for value, expected, tolerance in zip(stats["kurtosis"], (0.0, -1.2, 3.0), (0.15, 0.08, 1.2)):
        assert value == pytest.approx(expected, abs=tolerance)
    assert stats["std"][3] == pytest.approx(0.0, abs=1e-6) and math.isnan(stats["kurtosis"][3])
    # Summaries: the dead channel sets the minimum std; kurtosis summaries use the three live channels.
    assert stats["std_min"] == pytest.approx(0.0, abs=1e-6)
    assert stats["std_mean"] == pytest.approx(np.mean(stats["std"]))
    assert stats["kurtosis_max_abs"] == pytest.approx(abs(stats["kurtosis"][2]))
    assert stats["kurtosis_mean"] == pytest.approx(np.mean(stats["kurtosis"][:3]))


# ---------------------------------------------------------------- latent_quality and equivariance

def test_latent_quality_returns_the_stable_keys_as_finite_floats():
    z = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = latent_quality(z)
    assert tuple(out) == KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["hf_energy"] > 0.5 and 0.8 < out["channel_std_mean"] < 1.2
    assert out["channel_std_min_ratio"] == pytest.approx(out["channel_std_min"] / out["channel_std_mean"])
    with pytest.raises(ValueError, match="encoder, decoder and images together"):
        latent_quality(z, encoder=lambda x: x)


def test_equivariance_is_delegated_to_losses(monkeypatch):
    """The measure calls raydae.losses.equivariance_error (no transform code of its own) and flattens its names."""
    calls = []

    def fake(encode, decode, images, scales, rotations=True):
        calls.append((encode, decode, tuple(images.shape), scales, rotations))
        return {"reconstruction_error": 0.125, "decoder_error": 0.25, "decoder_error/scale0.5": 0.5}

    monkeypatch.setattr(losses, "equivariance_error", fake, raising=False)
    encoder, decoder = torch.nn.Identity(), torch.nn.Identity()
    images = torch.zeros(2, 3, 8, 8)
    out = latent_quality(torch.randn(2, 4, 4, 4), encoder=encoder, decoder=decoder, images=images,
                         scales=[0.5], rotations=False)
    assert calls == [(encoder, decoder, (2, 3, 8, 8), [0.5], False)]
    assert {k: v for k, v in out.items() if k not in KEYS} == {
        "equivariance_reconstruction_error": 0.125, "equivariance_decoder_error": 0.25,
        "equivariance_decoder_error_scale0p5": 0.5}


def test_real_equivariance_errors_vanish_for_an_identity_autoencoder_and_not_for_a_shifting_one():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    identity = torch.nn.Identity()
    out = equivariance_errors(identity, identity, images)
    names = {"equivariance_decoder_error", "equivariance_encoder_error", "equivariance_reconstruction_error",
             "equivariance_decoder_error_scale0p5", "equivariance_encoder_error_scale0p75",
             "equivariance_decoder_error_rot90"}
    assert names <= set(out) and not any("." in key or "/" in key for key in out)
    assert all(abs(value) < 1e-5 for value in out.values()), out
    # An encoder that rolls its latent by one pixel commutes with no rotation: a clearly positive error.
    shifted = equivariance_errors(lambda x: torch.roll(x, 1, dims=-1), identity, images)
    assert shifted["equivariance_encoder_error_rot90"] > 0.1


# ---------------------------------------------------------------- Spearman ρ and its bootstrap interval

def test_average_ranks_and_spearman_with_ties_by_hand():
    assert average_ranks([10, 20, 20]).tolist() == [1.0, 2.5, 2.5]
    assert average_ranks([3, 1, 3, 3, 2]).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]
    # ranks x: 1, 2.5, 2.5, 4, 5; ranks y: 2, 1, 3, 5, 4 -> Σdxdy = 7, Σdx² = 9.5, Σdy² = 10
    assert spearman([1, 2, 2, 3, 4], [2, 1, 3, 5, 4]) == pytest.approx(7 / math.sqrt(95))


def test_spearman_is_one_for_monotone_data_and_undefined_for_a_constant():
    x = [0.1, 0.5, 2.0, 3.0, 10.0]
    assert spearman(x, [math.exp(v) for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-(v**3) for v in x]) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, [1.0] * 5))
    with pytest.raises(ValueError, match="5 x values but 4 y values"):
        spearman(x, x[:4])


def test_bootstrap_interval_contains_rho_and_shrinks_with_more_runs():
    rng = np.random.default_rng(6)

    def interval(n):
        x = np.arange(n, dtype=float)
        return spearman_bootstrap(x, x + rng.normal(0, n / 3, n), seed=0)

    small, large = interval(10), interval(200)
    for result in (small, large):
        assert result["low"] <= result["rho"] <= result["high"]
        assert 0 < result["rho"] < 1
    assert small["n"] == 10 and large["n"] == 200
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    assert spearman_bootstrap([1, 2, 3, 4], [4, 3, 2, 1]) == {"rho": pytest.approx(-1.0), "low": -1.0,
                                                              "high": -1.0, "n": 4}
    y = rng.normal(size=10)
    assert spearman_bootstrap(np.arange(10.0), y) == spearman_bootstrap(np.arange(10.0), y)  # fixed seed


def test_probe_generator_ranks_a_smooth_latent_below_its_scrambled_twin_and_noise():
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randn(256, 4, 2, 2), size=8, mode="bilinear")
    smooth = smooth + 0.05 * torch.randn_like(smooth)
    losses = {name: probe_generator_loss(z, steps=60) for name, z in
              (("smooth", smooth), ("scrambled", sign_scramble(smooth)), ("noise", torch.randn(256, 4, 8, 8)))}
    assert losses["smooth"] < losses["scrambled"] < losses["noise"]
    assert losses["noise"] > 0.8  # unstructured latents: close to what predicting zero scores (1)
    assert probe_generator_loss(smooth, steps=60) == losses["smooth"]  # fixed draws: the same number again
    with pytest.raises(ValueError, match=">= 10 latents"):
        probe_generator_loss(smooth[:5], steps=10)
