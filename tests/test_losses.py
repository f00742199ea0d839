"""Reconstruction, hinge and adaptive-weight losses on hand-made tensors; LPIPS loading checks."""

from __future__ import annotations

import pytest
import torch

from raydae.config import EquivarianceConfig, LossConfig
from raydae.errors import UserError
from raydae.losses import (
    LPIPS,
    SpatialTransform,
    adaptive_gan_weight,
    build_lpips,
    draw_equivariance_step,
    equivariance_error,
    equivariance_loss,
    equivariance_transforms,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)


def test_reconstruction_losses_on_known_values():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx((1 + 0 + 2 + 1) / 4)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx((1 + 0 + 4 + 1) / 4)
    with pytest.raises(ValueError, match="l3"):
        reconstruction_loss(x, x_hat, "l3")


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0])  # relu(1 + fake) = 0, 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 0.5))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_adaptive_gan_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3)
    y = layer(x)
    rec_loss = y.pow(2).sum()  # d/dW = 2 y^T x
    g_loss = -(3.0 * y).sum()  # d/dW = -3 * 1^T x
    rec_grad = 2 * y.detach().t() @ x
    g_grad = -3.0 * torch.ones(4, 2).t() @ x
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_gan_weight(rec_loss, g_loss, layer.weight)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not weight.requires_grad
    (rec_loss + weight * g_loss).backward()  # graphs were retained
    assert layer.weight.grad is not None
    assert adaptive_gan_weight(layer(x).pow(2).sum(), 1e-9 * layer(x).sum(), layer.weight, max_weight=7.0) == 7.0


# --------------------------------------------------------------------------- equivariance
QUARTER_TURNS = [SpatialTransform("rot90", k) for k in (1, 2, 3)]
DOWNSCALINGS = [SpatialTransform("scale", s) for s in (0.5, 0.75)]


def upsample_decoder(z):
    """Nearest 2x upsampling of the first 3 channels: commutes exactly with quarter turns."""
    return torch.nn.functional.interpolate(z[:, :3], scale_factor=2.0, mode="nearest")


def pixelwise_decoder(z):
    """A fixed 1x1 channel mix (factor 1): commutes exactly with any resizing done alike on every channel."""
    mix = torch.tensor([[1.0, -0.5], [0.3, 0.7], [-1.0, 0.2]])
    return torch.einsum("oc,bchw->bohw", mix, z)


def test_transforms_resize_and_rotate_any_tensor_alike():
    x = torch.arange(2 * 5 * 8 * 8, dtype=torch.float32).view(2, 5, 8, 8)
    assert SpatialTransform("scale", 0.75)(x).shape == (2, 5, 6, 6)
    assert torch.equal(SpatialTransform("rot90", 2)(x), x.flip(-1).flip(-2))
    assert SpatialTransform("scale", 0.5)(x.bfloat16()).dtype == torch.bfloat16
    names = [t.name for t in equivariance_transforms([0.5, 0.75], rotations=True)]
    assert names == ["scale0.5", "scale0.75", "rot90", "rot180", "rot270"]
    assert equivariance_transforms([0.5], rotations=False) == [SpatialTransform("scale", 0.5)]


@pytest.mark.parametrize("transform", QUARTER_TURNS, ids=lambda t: t.name)
def test_equivariance_loss_is_zero_for_a_decoder_that_commutes_with_rotations(transform):
    z = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    images = upsample_decoder(z)
    assert equivariance_loss(upsample_decoder, z, images, transform, "l1").item() == 0.0
    # A decoder that knows where "up" is: the same latent decodes with a vertical ramp added.
    ramp = torch.linspace(-1, 1, 12).view(1, 1, 12, 1)
    tilted = equivariance_loss(lambda v: upsample_decoder(v) + ramp, z, images + ramp, transform, "l1")
    assert tilted.item() > 0.1


@pytest.mark.parametrize("transform", DOWNSCALINGS, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_equivariance_loss_is_zero_for_a_decoder_that_commutes_with_downscaling(transform, kind):
    z = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pixelwise_decoder(z)
    assert equivariance_loss(pixelwise_decoder, z, images, transform, kind).item() < 1e-6
    # An upsampling decoder does not commute with antialiased downscaling: its error is clearly positive.
    blocky = equivariance_loss(upsample_decoder, z.repeat(1, 2, 1, 1), upsample_decoder(z.repeat(1, 2, 1, 1)),
                               transform, kind)
    assert blocky.item() > 0.01


def test_equivariance_loss_refuses_a_scale_without_a_whole_latent_side():
    z = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="scale0.7 of a 6x6 tensor is not a whole size: 4.2x4.2"):
        equivariance_loss(upsample_decoder, z, upsample_decoder(z), SpatialTransform("scale", 0.7), "l1")


@pytest.mark.parametrize("transform", [DOWNSCALINGS[1], QUARTER_TURNS[0]], ids=lambda t: t.name)
def test_equivariance_loss_trains_encoder_and_decoder(transform):
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(3, 4, 2, stride=2)
    decoder = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2.0), torch.nn.Conv2d(4, 3, 3, padding=1))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = equivariance_loss(decoder, encoder(images), images, transform, "l2")
    loss.backward()
    for module in (encoder, decoder):
        for param in module.parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_draw_equivariance_step_is_seeded_by_step_and_follows_probability():
    cfg = EquivarianceConfig(weight=1.0, probability=0.25, scales=[0.5, 0.75], rotations=True)
    draws = [draw_equivariance_step(cfg, seed=3, step=step) for step in range(400)]
    assert draws == [draw_equivariance_step(cfg, seed=3, step=step) for step in range(400)]  # same on every rank
    assert draws != [draw_equivariance_step(cfg, seed=4, step=step) for step in range(400)]
    assert {t.name for t, _ in draws} == {"scale0.5", "scale0.75", "rot90", "rot180", "rot270"}
    assert 0.15 < sum(trains for _, trains in draws) / len(draws) < 0.35
    always = EquivarianceConfig(weight=1.0, probability=1.0, scales=[], rotations=True)
    assert all(draw_equivariance_step(always, 0, step)[1] for step in range(50))


def test_equivariance_error_separates_encoder_and_decoder_sides():
    images = upsample_decoder(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    average_pool = lambda x: torch.nn.functional.avg_pool2d(x, 2)  # noqa: E731 - inverse of upsample_decoder
    exact = equivariance_error(average_pool, upsample_decoder, images, scales=[], rotations=True)
    assert set(exact) == {"reconstruction_error", "decoder_error", "encoder_error",
                          *(f"{side}/rot{a}" for side in ("decoder_error", "encoder_error") for a in (90, 180, 270))}
    assert max(exact.values()) < 1e-12
    # A shifted encoder breaks the encoder side; the decoder side then only repeats the reconstruction error,
    # since a rotation-commuting decoder makes decode(T z) vs T x a permutation of decode(z) vs x.
    shifted = lambda x: average_pool(x).roll(1, dims=-1)  # noqa: E731
    broken = equivariance_error(shifted, upsample_decoder, images, scales=[0.5], rotations=True)
    assert broken["encoder_error/rot90"] > 0.5 and broken["encoder_error"] > 0.5
    assert broken["reconstruction_error"] > 0.5
    assert broken["decoder_error/rot90"] == pytest.approx(broken["reconstruction_error"], rel=1e-6)
    assert broken["decoder_error"] == pytest.approx(
        sum(broken[f"decoder_error/{name}"] for name in ("scale0.5", "rot90", "rot180", "rot270")) / 4)
    with pytest.raises(ValueError, match="at least one transform"):
        equivariance_error(average_pool, upsample_decoder, images, scales=[], rotations=False)


# --------------------------------------------------------------------------------- LPIPS
# Written out here on purpose (not imported from raydae.losses): the layouts of the real files.
VGG_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
             14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
             26: (512, 512), 28: (512, 512)}  # fmt: skip
LIN_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, (c_in, c_out) in VGG_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(c_out)
    state["classifier.6.weight"] = torch.randn(10, 4)  # ignored, whatever its shape
    return state


def lpips_state() -> dict[str, torch.Tensor]:
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LIN_CHANNELS)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    vgg, lin = folder / "vgg16-397923af.pth", folder / "vgg.pth"
    torch.save(vgg16_state(), vgg)
    torch.save(lpips_state(), lin)
    return str(lin), str(vgg)


def test_lpips_from_files_measures_distance(weight_files):
    lpips = LPIPS.from_files(*weight_files)
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # stays frozen inside a parent's .train()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    same = lpips(x, x)
    assert same.shape == (2,)
    assert torch.allclose(same, torch.zeros(2))
    different = lpips(x, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert (different > 0).all()
    loaded = torch.load(weight_files[1], weights_only=True)["features.28.weight"]
    assert torch.equal(lpips.features[28].weight, loaded)


def test_lpips_gradient_flows_to_input(weight_files):
    lpips = LPIPS.from_files(*weight_files)
    x_hat = torch.zeros(1, 3, 16, 16, requires_grad=True)
    lpips(torch.rand(1, 3, 16, 16) * 2 - 1, x_hat).sum().backward()
    assert x_hat.grad.abs().sum() > 0


def test_lpips_missing_file_names_it(weight_files, tmp_path):
    lin, vgg = weight_files
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"loss\.vgg16_weights=.*nope\.pth: file not found"):
        LPIPS.from_files(lin, missing)
    with pytest.raises(UserError, match=r"loss\.lpips_weights=.*nope\.pth: file not found"):
        LPIPS.from_files(missing, vgg)


def test_lpips_wrong_layout_names_file_and_key(weight_files, tmp_path):
    lin, vgg = weight_files
    state = vgg16_state()
    del state["features.0.weight"]
    no_key = tmp_path / "no_key.pth"
    torch.save(state, no_key)
    expected = r"no_key\.pth: missing key features\.0\.weight; expected torchvision"
    with pytest.raises(UserError, match=expected) as err:
        LPIPS.from_files(lin, no_key)
    assert "\n" not in str(err.value)

    heads = lpips_state()
    heads["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(heads, bad_shape)
    with pytest.raises(UserError, match=r"bad_shape\.pth: lin2\.model\.1\.weight has shape \(1, 128, 1, 1\)"):
        LPIPS.from_files(bad_shape, vgg)

    swapped = tmp_path / "swapped.pth"
    torch.save(lpips_state(), swapped)
    with pytest.raises(UserError, match="swapped.pth: missing key features"):
        LPIPS.from_files(lin, swapped)

    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth: not a readable PyTorch state dict"):
        LPIPS.from_files(garbage, vgg)


def test_build_lpips_needs_both_files(weight_files):
    lin, vgg = weight_files
    assert build_lpips(LossConfig()) is None
    with pytest.raises(UserError, match="loss.vgg16_weights is empty"):
        build_lpips(LossConfig(lpips_weights=lin))
    with pytest.raises(UserError, match="loss.lpips_weights is empty"):
        build_lpips(LossConfig(vgg16_weights=vgg))
    assert isinstance(build_lpips(LossConfig(lpips_weights=lin, vgg16_weights=vgg)), LPIPS)
