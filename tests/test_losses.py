"""Reconstruction, hinge and adaptive-weight losses on hand-made tensors; LPIPS loading checks."""

from __future__ import annotations

import pytest
import torch

from raydae.config import LossConfig
from raydae.errors import UserError
from raydae.losses import (
    LPIPS,
    adaptive_gan_weight,
    build_lpips,
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
