"""ae.sign_scramble, the positive control: same reconstructions, a latent the generator finds harder."""

from __future__ import annotations

import pytest
import torch

from raydae.config import AutoencoderConfig, Config, DecoderConfig, KLConfig, validate
from raydae.errors import UserError
from raydae.eval.latent_quality import high_frequency_energy
from raydae.models import build_bottleneck, build_decoder, build_encoder
from raydae.models.kl import sign_scramble


def _autoencoder(scramble: bool):
    cfg = AutoencoderConfig(base_channels=8, channel_mults=[1, 2], downsample_factor=2, num_res_blocks=1,
                            latent_channels=4, kl=KLConfig(weight=1e-5), sign_scramble=scramble)
    torch.manual_seed(0)
    return build_encoder(cfg), build_bottleneck(cfg), build_decoder(cfg, DecoderConfig())


def test_sign_scramble_is_its_own_inverse_and_fixed():
    z = torch.randn(3, 4, 8, 8)
    assert torch.equal(sign_scramble(sign_scramble(z)), z)
    assert torch.equal(sign_scramble(z), sign_scramble(z.clone()))
    flipped = (sign_scramble(torch.ones(1, 4, 8, 8)) < 0).float().mean().item()
    assert 0.35 < flipped < 0.65


@pytest.mark.parametrize("sample", [False, True])
def test_scrambled_autoencoder_reconstructs_exactly_like_the_plain_one(sample):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    outputs = {}
    for scramble in (False, True):
        encoder, bottleneck, decoder = _autoencoder(scramble)
        torch.manual_seed(1)  # the same posterior draw: training goes bit for bit alike
        with torch.no_grad():
            out = bottleneck(encoder(images), sample=sample)
            outputs[scramble] = (out.z, decoder(out.z), out.loss)
            if scramble:
                assert torch.equal(out.posterior[0], bottleneck.encode(encoder(images))[0])
    plain_z, plain_x, plain_kl = outputs[False]
    scrambled_z, scrambled_x, scrambled_kl = outputs[True]
    assert torch.equal(scrambled_x, plain_x)
    assert torch.equal(scrambled_kl, plain_kl)
    assert not torch.equal(scrambled_z, plain_z)
    # The generator's view: a smooth latent turned into one dominated by high spatial frequencies.
    smooth = torch.nn.functional.avg_pool2d(torch.randn(64, 4, 12, 12), 5, stride=1)
    assert high_frequency_energy(sign_scramble(smooth)) > 2 * high_frequency_energy(smooth)


@pytest.mark.parametrize("setting, message", [
    ({"ae.bottleneck": "vq"}, "KL bottleneck only"),
    ({"loss.equivariance.weight": 1.0}, "cannot commute"),
])
def test_sign_scramble_refuses_what_it_cannot_mean(setting, message):
    config = Config()
    config.ae.sign_scramble = True
    section, name = next(iter(setting)).rsplit(".", 1)
    target = config
    for part in section.split("."):
        target = getattr(target, part)
    setattr(target, name, next(iter(setting.values())))
    with pytest.raises(UserError, match=message):
        validate(config)
