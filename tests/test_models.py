"""Encoder/decoder shapes and capacity knobs, the KL and VQ bottlenecks, the discriminator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from raydae.config import AutoencoderConfig, DecoderConfig, DiscriminatorConfig, KLConfig, VQConfig
from raydae.models import (
    DiagonalGaussianBottleneck,
    NLayerDiscriminator,
    VectorQuantizer,
    build_bottleneck,
    build_decoder,
    build_discriminator,
    build_encoder,
    count_parameters,
    latent_shape,
)


def small_ae(**overrides) -> AutoencoderConfig:
    fields = dict(
        base_channels=8,
        channel_mults=[1, 2],
        downsample_factor=2,
        num_res_blocks=1,
        latent_channels=4,
        decoder=DecoderConfig(width=1.0, num_res_blocks=1),
        aux_decoder=DecoderConfig(width=0.5, num_res_blocks=1),
        vq=VQConfig(codebook_size=16),
    )
    fields.update(overrides)
    return AutoencoderConfig(**fields)


# ------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
@pytest.mark.parametrize(
    "mults,latent_channels", [([1], 3), ([1, 2], 4), ([1, 2, 2], 8), ([1, 1, 2, 2], 2)]
)
def test_autoencoder_shapes(bottleneck, mults, latent_channels):
    ae = small_ae(
        channel_mults=mults,
        downsample_factor=2 ** (len(mults) - 1),
        latent_channels=latent_channels,
        bottleneck=bottleneck,
    )
    encoder, quantizer = build_encoder(ae), build_bottleneck(ae)
    decoder, aux = build_decoder(ae, ae.decoder), build_decoder(ae, ae.aux_decoder)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    h = encoder(x)
    side = 16 // ae.downsample_factor
    expected_h = 2 * latent_channels if bottleneck == "kl" else latent_channels
    assert h.shape == (2, expected_h, side, side)
    out = quantizer(h)
    assert out.z.shape == (2, *latent_shape(ae, 16))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert (out.indices is None) == (bottleneck == "kl")
    assert decoder(out.z).shape == x.shape
    assert aux(out.z).shape == x.shape
    assert isinstance(quantizer, DiagonalGaussianBottleneck if bottleneck == "kl" else VectorQuantizer)


def test_last_layer_is_final_conv_weight():
    ae = small_ae()
    decoder = build_decoder(ae, ae.decoder)
    assert decoder.last_layer is decoder.conv_out.weight
    assert decoder.last_layer.shape[0] == 3


# ----------------------------------------------------------------------- capacity knobs
def test_weaker_decoder_has_fewer_parameters():
    ae = small_ae(base_channels=16, decoder=DecoderConfig(width=1.0, num_res_blocks=2))
    full = count_parameters(build_decoder(ae, ae.decoder))
    narrow = count_parameters(build_decoder(ae, DecoderConfig(width=0.5, num_res_blocks=2)))
    shallow = count_parameters(build_decoder(ae, DecoderConfig(width=1.0, num_res_blocks=1)))
    none = count_parameters(build_decoder(ae, DecoderConfig(width=1.0, num_res_blocks=0)))
    assert narrow < full and shallow < full and none < shallow


def test_width_rounds_channels_to_multiples_of_8():
    ae = small_ae(base_channels=12, channel_mults=[1, 3])
    decoder = build_decoder(ae, DecoderConfig(width=0.3, num_res_blocks=1))  # 3.6 and 10.8 channels
    convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    widths = {c.out_channels for c in convs[:-1]}
    assert widths == {8}
    assert decoder(torch.randn(1, 4, 4, 4)).shape == (1, 3, 8, 8)


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    ae = small_ae()
    decoder = build_decoder(ae, DecoderConfig(width=1.0, num_res_blocks=1, dropout=0.5))
    z = torch.randn(2, 4, 4, 4)
    decoder.train()
    assert not torch.allclose(decoder(z), decoder(z))
    decoder.eval()
    assert torch.equal(decoder(z), decoder(z))


# ---------------------------------------------------------------------------------- KL
def test_kl_is_zero_for_standard_normal_posterior():
    kl = DiagonalGaussianBottleneck(latent_channels=2, kl_weight=0.1)
    out = kl(torch.zeros(3, 4, 5, 5))
    assert out.stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_closed_form_and_is_weighted():
    kl = DiagonalGaussianBottleneck(latent_channels=1, kl_weight=0.5)
    h = torch.zeros(2, 2, 1, 2)
    h[:, 0] = 1.0  # mean 1, logvar 0: 0.5 * mean^2 per dim, 2 dims per image
    out = kl(h)
    assert out.stats["kl"].item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(0.5)
    h2 = torch.zeros(2, 2, 1, 2)
    h2[:, 1] = 2.0  # logvar 2: 0.5 * (e^2 - 1 - 2) per dim
    assert kl(h2).stats["kl"].item() == pytest.approx(math.exp(2) - 3, rel=1e-5)


def test_kl_sample_false_returns_mean_and_logvar_is_clamped():
    kl = DiagonalGaussianBottleneck(latent_channels=2, kl_weight=1.0)
    h = torch.randn(2, 4, 3, 3)
    h[:, 2:] = 100.0
    mean, logvar = kl.encode(h)
    assert logvar.max().item() == 20.0
    out = kl(h, sample=False)
    assert torch.equal(out.z, h[:, :2])
    torch.manual_seed(0)
    sampled = kl(torch.cat([h[:, :2], torch.zeros_like(h[:, :2])], dim=1))
    assert not torch.allclose(sampled.z, mean)
    assert sampled.stats["latent_std"] > 0


def test_build_bottleneck_uses_config():
    kl = build_bottleneck(small_ae(kl=KLConfig(weight=0.25)))
    assert kl.kl_weight == 0.25
    vq = build_bottleneck(small_ae(bottleneck="vq", vq=VQConfig(codebook_size=7, ema=False, l2_normalize=True)))
    assert vq.codebook_size == 7 and vq.dim == 4 and not vq.ema and vq.l2_normalize
    assert isinstance(vq.embedding, torch.nn.Parameter)


# ---------------------------------------------------------------------------------- VQ
@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("l2", [True, False])
def test_vq_indices_decode_to_quantized_latents(ema, l2):
    vq = VectorQuantizer(32, 4, ema=ema, l2_normalize=l2).eval()
    out = vq(torch.randn(2, 4, 5, 6))
    assert out.indices.shape == (2, 5, 6) and out.indices.dtype == torch.long
    assert torch.equal(vq.decode_indices(out.indices), out.z)
    assert torch.equal(vq.encode_indices(out.z), out.indices)


def test_vq_picks_the_nearest_code():
    vq = VectorQuantizer(3, 2, restart_dead_codes=False).eval()
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    h = torch.tensor([[9.0, 1.0], [1.0, 8.0], [0.5, -0.5]]).t().reshape(1, 2, 1, 3)
    assert vq.encode_indices(h).flatten().tolist() == [1, 2, 0]


def test_vq_straight_through_gradient_reaches_input():
    vq = VectorQuantizer(16, 4).eval()
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(h)
    weights = torch.randn_like(out.z)
    (out.z * weights).sum().backward()
    # identity Jacobian through the quantiser, plus nothing else (loss was not backpropagated)
    assert torch.allclose(h.grad, weights)


def test_vq_perplexity_and_usage():
    vq = VectorQuantizer(4, 2, restart_dead_codes=False).eval()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    vq.embedding.copy_(codes)
    every_code = codes.t().reshape(1, 2, 2, 2)
    out = vq(every_code)
    assert out.stats["codebook_usage"].item() == 1.0
    assert out.stats["perplexity"].item() == pytest.approx(4.0)
    assert out.stats["commitment"].item() == pytest.approx(0.0)
    one_code = torch.zeros(1, 2, 2, 2)
    out = vq(one_code)
    assert out.stats["codebook_usage"].item() == 0.25
    assert out.stats["perplexity"].item() == pytest.approx(1.0)
    random = vq(torch.randn(4, 2, 4, 4) * 10)
    assert 1.0 <= random.stats["perplexity"].item() <= 4.0 + 1e-5
    assert 0.0 < random.stats["codebook_usage"].item() <= 1.0


def test_vq_ema_moves_codes_toward_data_in_train_mode_only():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 3, ema=True, ema_decay=0.5, restart_dead_codes=False)
    target = torch.tensor([5.0, -3.0, 2.0])
    h = (target + 0.1 * torch.randn(64, 3)).t().reshape(1, 3, 8, 8)

    vq.eval()
    before = {k: v.clone() for k, v in vq.named_buffers()}
    vq(h)
    for name, buf in vq.named_buffers():
        assert torch.equal(buf, before[name]), name

    vq.train()
    code = vq.encode_indices(h).flatten().mode().values.item()
    dist_before = (vq.embedding[code] - target).norm()
    for _ in range(3):
        vq(h)
    dist_after = (vq.embedding[code] - target).norm()
    assert dist_after < 0.3 * dist_before
    assert vq.cluster_size[code] > 1.0


def test_frozen_quantizer_keeps_codebook():
    vq = VectorQuantizer(8, 4, ema=True, restart_dead_codes=True)
    vq.requires_grad_(False).eval()
    before = vq.embedding.clone()
    vq(torch.randn(4, 4, 4, 4) * 5)
    assert torch.equal(vq.embedding, before)


@pytest.mark.parametrize("ema", [True, False])
def test_vq_dead_codes_are_restarted_from_batch(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=ema, ema_decay=0.9, restart_dead_codes=True, dead_code_threshold=1.0)
    vq.embedding.data.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    h = (torch.randn(2, 2, 4, 4) * 0.5 + 1.0)  # all nearest to code 0
    flat = h.permute(0, 2, 3, 1).reshape(-1, 2)
    vq.train()
    vq(h)
    for code in (1, 2, 3):
        nearest_input = (flat - vq.embedding[code]).norm(dim=1).min()
        assert nearest_input < 1e-5, code  # re-seeded with an encoder output of the batch
        assert vq.cluster_size[code] == pytest.approx(1.0)


def test_vq_without_restart_leaves_dead_codes():
    vq = VectorQuantizer(2, 2, ema=True, restart_dead_codes=False)
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    vq.embed_sum.copy_(vq.embedding)
    vq.train()
    vq(torch.zeros(1, 2, 2, 2))
    assert torch.allclose(vq.embedding[1], torch.tensor([100.0, 100.0]), rtol=1e-3)


def test_vq_l2_normalized_codes_have_unit_norm():
    vq = VectorQuantizer(16, 4, ema=True, l2_normalize=True).train()
    for _ in range(2):
        out = vq(torch.randn(2, 4, 4, 4) * 3)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(vq.embedding.norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(out.z.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


def test_vq_gradient_mode_trains_codebook():
    vq = VectorQuantizer(8, 4, ema=False, restart_dead_codes=False).train()
    assert vq.embedding.requires_grad
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(h)
    out.loss.backward()
    assert vq.embedding.grad is not None and vq.embedding.grad.abs().sum() > 0
    assert h.grad.abs().sum() > 0  # commitment term

    ema = VectorQuantizer(8, 4, ema=True)
    assert not any(p.requires_grad for p in ema.parameters())
    assert list(ema.parameters()) == []


def _ddp_worker(rank: int, world_size: int, init_file: str, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=20)
    )
    torch.manual_seed(0)  # same initial codebook on both ranks, as DDP gives
    vq = VectorQuantizer(8, 3, ema=True, ema_decay=0.8, dead_code_threshold=1.0).train()
    torch.manual_seed(100 + rank)  # different data and restart draws per rank
    for _ in range(3):
        # one tight cluster per rank: most codes go unused and are re-seeded every step
        vq(torch.randn(2, 3, 4, 4) * 0.1 + (5.0 if rank == 0 else -5.0))
    restarted = int((vq.cluster_size == 1.0).sum())
    results[rank] = (vq.embedding.clone(), vq.cluster_size.clone(), restarted)
    dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_vq_ddp_ranks_keep_identical_codebooks(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    (emb0, size0, restarted), (emb1, size1, _) = results[0], results[1]
    assert restarted > 0  # the broadcast of re-seeded codes was exercised
    assert torch.equal(emb0, emb1)
    assert torch.equal(size0, size1)


# ------------------------------------------------------------------------- discriminator
def test_discriminator_outputs_patch_logits():
    disc = NLayerDiscriminator(in_channels=3, base_channels=8, num_layers=3)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 2, 2)
    built = build_discriminator(DiscriminatorConfig(base_channels=8, num_layers=2))
    assert built(torch.randn(1, 3, 16, 16)).shape == (1, 1, 2, 2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())


# --------------------------------------------------------------------------- end to end
def test_small_autoencoder_overfits_two_images():
    torch.manual_seed(0)
    ae = small_ae()
    encoder, bottleneck, decoder = build_encoder(ae), build_bottleneck(ae), build_decoder(ae, ae.decoder)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    losses = []
    for _ in range(30):
        out = bottleneck(encoder(x), sample=False)
        loss = (decoder(out.z) - x).abs().mean() + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
