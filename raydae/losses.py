"""Autoencoder losses: reconstruction, hinge GAN, the adaptive GAN weight, and LPIPS.

LPIPS is built here from two local weight files (never downloaded): torchvision's VGG16
(`vgg16-397923af.pth`) and the `lpips` package's linear heads (`weights/v0.1/vgg.pth`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from raydae.config import LossConfig
from raydae.errors import UserError


# ----------------------------------------------------------------------------- reconstruction
def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str) -> Tensor:
    """Mean absolute ("l1") or squared ("l2") error over every pixel and channel."""
    if kind == "l1":
        return (x - x_hat).abs().mean()
    if kind == "l2":
        return (x - x_hat).pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected l1 or l2")


# ---------------------------------------------------------------------------------------- GAN
def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d rec_loss / d last_layer|| / ||d g_loss / d last_layer||, clamped to [0, max_weight], detached.

    taming-transformers' balance: the GAN term gets as much gradient at the decoder's last layer as
    the reconstruction term. Multiply by `loss.discriminator.weight` yourself. Both losses keep
    their graphs (retain_graph) for the backward pass that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# -------------------------------------------------------------------------------------- LPIPS
# torchvision's vgg16().features: (index, in, out) of every conv; ReLU after each, max-pool at 4, 9,
# 16, 23. LPIPS taps the ReLUs after convs 2, 5, 14, 21 and 28 (relu1_2 ... relu5_3).
VGG16_CONVS = [
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
]  # fmt: skip
VGG16_POOLS = (4, 9, 16, 23)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # features[:tap + 1] ends at each tapped ReLU
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised VGG inputs.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

_VGG_HINT = "expected torchvision's vgg16-397923af.pth"
_LPIPS_HINT = "expected the lpips package's weights/v0.1/vgg.pth"


class _LinearHead(nn.Module):
    """1x1 conv C -> 1 without bias; `model.1` so the lpips package's keys load as they are."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))  # 0: lpips' dropout


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG variant. Frozen: never trained.

    forward(x, y) takes images in [-1, 1] and returns one distance per image, shape (B,).
    """

    def __init__(self):
        super().__init__()
        # Constants, not weights: left out of the state dict, which holds exactly the two files' keys.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        layers: list[nn.Module] = []
        for index, c_in, c_out in VGG16_CONVS:
            while len(layers) < index:  # the pools between conv+ReLU pairs
                layers.append(nn.MaxPool2d(2, 2) if len(layers) in VGG16_POOLS else nn.ReLU())
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        layers.append(nn.ReLU())  # index 29: relu5_3
        self.features = nn.Sequential(*layers)
        for k, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # stays in eval mode inside a parent's .train()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        start = 0
        for k, tap in enumerate(LPIPS_TAPS):
            block = self.features[start : tap + 1]
            h_x, h_y = block(h_x), block(h_y)
            start = tap + 1
            diff = (_unit_channels(h_x) - _unit_channels(h_y)).pow(2)
            head: _LinearHead = getattr(self, f"lin{k}")
            total = total + head.model(diff).mean(dim=(1, 2, 3))
        return total

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_files(cls, lpips_path: str | Path, vgg16_path: str | Path) -> "LPIPS":
        """Build from local files; UserError naming the file for a missing file or a wrong layout."""
        model = cls()
        vgg_expected = {
            f"features.{i}.{name}": shape
            for i, c_in, c_out in VGG16_CONVS
            for name, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,)))
        }
        lin_expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
        vgg = _load_checked(vgg16_path, "loss.vgg16_weights", vgg_expected, _VGG_HINT)
        lin = _load_checked(lpips_path, "loss.lpips_weights", lin_expected, _LPIPS_HINT)
        model.load_state_dict({**vgg, **lin})
        return model


def _unit_channels(h: Tensor, eps: float = 1e-10) -> Tensor:
    return h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_checked(
    path: str | Path, key: str, expected: dict[str, tuple[int, ...]], hint: str
) -> dict[str, Tensor]:
    """Load a state dict and keep exactly the `expected` entries; extra keys (classifier) are ignored."""
    where = f"{key}={path}"
    if not Path(path).is_file():
        raise UserError(f"{where}: file not found; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"{where}: not a readable PyTorch state dict ({err.__class__.__name__}); {hint}") from None
    if not isinstance(state, dict):
        raise UserError(f"{where}: holds a {type(state).__name__}, not a state dict; {hint}")
    picked = {}
    for name, shape in expected.items():
        tensor = state.get(name)
        if not isinstance(tensor, Tensor):
            raise UserError(f"{where}: missing key {name}; {hint}")
        if tuple(tensor.shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {shape}; {hint}")
        picked[name] = tensor.float()
    return picked


def build_lpips(loss_cfg: LossConfig) -> LPIPS | None:
    """LPIPS from `loss.lpips_weights` and `loss.vgg16_weights`; None when neither is given."""
    if not loss_cfg.lpips_weights and not loss_cfg.vgg16_weights:
        return None
    if not loss_cfg.lpips_weights or not loss_cfg.vgg16_weights:
        missing = "loss.lpips_weights" if not loss_cfg.lpips_weights else "loss.vgg16_weights"
        raise UserError(f"LPIPS needs both weight files: {missing} is empty; give it or clear the other one")
    return LPIPS.from_files(loss_cfg.lpips_weights, loss_cfg.vgg16_weights)
