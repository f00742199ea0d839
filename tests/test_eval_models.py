"""Evaluation models trained by raydae itself, on tiny data: the shapes classifier and the latent distance."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from raydae.config import AutoencoderConfig, DecoderConfig
from raydae.data.shapes import render_shapes
from raydae.eval.classifier import (
    ConvClassifier,
    class_distribution,
    kl_divergence,
    load_classifier,
    save_classifier,
    train_classifier,
)
from raydae.eval.latent_distance import Critic, estimate_latent_distance
from raydae.models import build_decoder


# ------------------------------------------------------------------------------ classifier
def _colour_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16×16 uint8 images: class 0 is reddish, class 1 bluish, both with pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    base = torch.where(labels[:, None] == 0, torch.tensor([200.0, 60.0, 60.0]), torch.tensor([60.0, 60.0, 200.0]))
    noise = torch.randn(n, 3, 16, 16, generator=generator) * 40
    return (base[:, :, None, None] + noise).clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def colour_classifier():
    images, labels = _colour_classes(256, seed=0)
    val = _colour_classes(128, seed=1)
    model, info = train_classifier(
        images, labels, num_classes=2, steps=40, batch_size=32, warmup_steps=5, width=8, seed=0, val=val
    )
    return model, info, val


def test_classifier_learns_an_easy_task_and_is_frozen(colour_classifier):
    model, info, _ = colour_classifier
    assert info["val_accuracy"] > 0.9 and info["train_accuracy"] > 0.9
    assert info["steps"] == 40 and info["seconds"] > 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_classifier_accepts_uint8_and_float_and_returns_cpu_float32_features(colour_classifier):
    model, _, (images, _) = colour_classifier
    from_uint8 = model.features(images, batch_size=50)  # chunks of 50: 3 chunks for 128 images
    from_float = model.features(images.float() / 127.5 - 1.0)
    assert from_uint8.shape == (128, model.feature_dim) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(from_uint8, from_float)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.features(images.float())


def test_classifier_training_is_deterministic_for_a_seed(colour_classifier):
    model, _, (images, _) = colour_classifier
    again, _ = train_classifier(*_colour_classes(256, seed=0), num_classes=2, steps=40, batch_size=32,
                                warmup_steps=5, width=8, seed=0)
    torch.testing.assert_close(again.features(images), model.features(images), rtol=0, atol=0)


def test_classifier_save_load_round_trip_gives_identical_features(colour_classifier, tmp_path):
    model, info, (images, _) = colour_classifier
    buffer = io.BytesIO()
    save_classifier(model, buffer, info)
    buffer.seek(0)
    loaded, loaded_info = load_classifier(buffer)
    assert isinstance(loaded, ConvClassifier) and not loaded.training
    assert loaded_info == info
    torch.testing.assert_close(loaded.features(images), model.features(images), rtol=0, atol=0)
    save_classifier(model, tmp_path / "classifier.pt", info)  # a path works too
    torch.testing.assert_close(load_classifier(tmp_path / "classifier.pt")[0].logits(images), model.logits(images))


def test_class_distribution_sums_to_one_and_follows_the_labels(colour_classifier):
    model, _, _ = colour_classifier
    images, labels = _colour_classes(200, seed=2)
    distribution = class_distribution(model, images)
    assert distribution.shape == (2,) and float(distribution.sum()) == pytest.approx(1.0)
    true = torch.bincount(labels, minlength=2).double() / len(labels)
    assert torch.allclose(distribution, true, atol=0.1)
    only_red = class_distribution(model, images[labels == 0])
    assert float(only_red[0]) > 0.9


def test_kl_divergence_is_zero_for_equal_distributions_and_positive_otherwise():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    q = torch.tensor([0.5, 0.3, 0.2])
    expected = float((p * (p / q).log()).sum())
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-4)
    # A class q never predicts: large but finite thanks to the smoothing.
    missing = kl_divergence(p, torch.tensor([0.0, 0.5, 0.5]))
    assert 1.0 < missing < float("inf")
    with pytest.raises(ValueError, match="length"):
        kl_divergence(p, torch.tensor([0.5, 0.5]))


# --------------------------------------------------------------------------- latent distance
TINY_AE = AutoencoderConfig(base_channels=8, channel_mults=[1, 2], downsample_factor=2, num_res_blocks=1,
                            latent_channels=3)


def _tiny_decoder():
    return build_decoder(TINY_AE, DecoderConfig(width=1.0, num_res_blocks=1))


def _shapes(split: str, n: int) -> torch.Tensor:
    images, _ = render_shapes(0, split, range(n), image_size=16, max_shapes=1)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _estimate(z_train, x_train, z_val, x_val, seed=0, decoder_steps=200, critic_steps=30, baseline=True):
    return estimate_latent_distance(_tiny_decoder, z_train, x_train, z_val, x_val, decoder_steps=decoder_steps,
                                    critic_steps=critic_steps, batch_size=16, lr=3e-3, critic_channels=16, seed=seed,
                                    baseline=baseline)


@pytest.fixture(scope="module")
def shapes16():
    x_train, x_val = _shapes("train", 128), _shapes("val", 64)
    informative = F.avg_pool2d(x_train, 2), F.avg_pool2d(x_val, 2)  # the images at half size: 3×8×8
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 3, 8, 8, generator=generator), torch.randn(64, 3, 8, 8, generator=generator)
    return x_train, x_val, informative, noise


def test_latent_distance_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(shapes16):
    x_train, x_val, (z_train, z_val), _ = shapes16
    cheap = {"decoder_steps": 5, "critic_steps": 5}
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = _estimate(z_train, x_train, z_val, x_val, seed=0, **cheap)
    assert torch.equal(torch.rand(3), before)
    second = _estimate(z_train, x_train, z_val, x_val, seed=0, **cheap)
    assert dataclasses.replace(first, seconds=0.0) == dataclasses.replace(second, seconds=0.0)
    other_seed = _estimate(z_train, x_train, z_val, x_val, seed=1, **cheap)
    assert other_seed.value != first.value
    assert first.decoder_parameters == sum(p.numel() for p in _tiny_decoder().parameters())
    # The baseline runs last, so skipping it changes nothing else.
    without = _estimate(z_train, x_train, z_val, x_val, seed=0, baseline=False, **cheap)
    assert without.real_vs_real is None and without.real_vs_real_train is None
    assert without.value == first.value and first.real_vs_real is not None


def test_latent_distance_is_lower_for_informative_latents_than_for_noise(shapes16):
    # Informative latents (the image at half size) let the tiny decoder reach the data; noise
    # independent of x cannot. Seeds 0-5 gave values 0.2-0.8 vs 4.9-9.1 when this was written.
    x_train, x_val, (informative_train, informative_val), (noise_train, noise_val) = shapes16
    near = _estimate(informative_train, x_train, informative_val, x_val, baseline=False)
    far = _estimate(noise_train, x_train, noise_val, x_val, baseline=False)
    assert far.value > 3 * near.value
    assert far.value - near.value > 3 * (near.value_stderr + far.value_stderr)
    assert far.paired_l2_val > 1.5 * near.paired_l2_val
    assert near.train_value < far.train_value


def test_latent_distance_rejects_unpaired_or_out_of_range_inputs(shapes16):
    x_train, x_val, (z_train, z_val), _ = shapes16
    with pytest.raises(ValueError, match="pairs"):
        _estimate(z_train[:10], x_train, z_val, x_val)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        _estimate(z_train, x_train * 2, z_val, x_val)


def test_critic_is_spectrally_normalised_on_every_layer():
    critic = Critic(channels=8)
    layers = [m for m in critic.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 4
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert critic(torch.zeros(5, 3, 16, 16)).shape == (5,)
