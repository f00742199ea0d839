"""Autoencoder losses: reconstruction, hinge GAN, the adaptive GAN weight, EQ-VAE's equivariance term
(and its measurement), and LPIPS.

LPIPS is built here from two local weight files (never downloaded): torchvision's VGG16
(`vgg16-397923af.pth`) and the `lpips` package's linear heads (`weights/v0.1/vgg.pth`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from raydae.config import EquivarianceConfig, LossConfig
from raydae.errors import UserError
from raydae.seeds import derive_seed


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


# ------------------------------------------------------------------------------- equivariance
# EQ-VAE (Kouzelis et al., ICML 2025): for a spatial transform T, decode(T z) should match T x. The same
# T acts on images and latents, so the training term and the measurement below share this code.
@dataclass(frozen=True)
class SpatialTransform:
    """A downscaling of the side (`kind="scale"`, `amount` the factor) or `amount` quarter turns (`"rot90"`)."""

    kind: str
    amount: float

    @property
    def name(self) -> str:
        return f"scale{self.amount:g}" if self.kind == "scale" else f"rot{90 * int(self.amount)}"

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, s H, s W), or rotated in the (H, W) plane; any C, the same on every channel."""
        if self.kind == "rot90":
            return torch.rot90(x, int(self.amount), dims=(-2, -1))
        exact = (x.shape[-2] * self.amount, x.shape[-1] * self.amount)
        size = (round(exact[0]), round(exact[1]))
        if abs(exact[0] - size[0]) > 1e-6 or abs(exact[1] - size[1]) > 1e-6 or min(size) < 1:
            # Rounding would scale latents and images by different factors.
            raise ValueError(f"{self.name} of a {x.shape[-2]}x{x.shape[-1]} tensor is not a whole size: "
                             f"{exact[0]:g}x{exact[1]:g}; use scales that give a whole latent side")
        # float32: antialiased resizing is not implemented for bf16 on every device
        resized = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return resized.to(x.dtype)


def equivariance_transforms(scales: list[float], rotations: bool) -> list[SpatialTransform]:
    """Every transform a step may draw: each downscaling, then the quarter turns (90, 180, 270 degrees)."""
    transforms = [SpatialTransform("scale", float(s)) for s in scales]
    if rotations:
        transforms += [SpatialTransform("rot90", k) for k in (1, 2, 3)]
    return transforms


def draw_equivariance_step(cfg: EquivarianceConfig, seed: int, step: int) -> tuple[SpatialTransform, bool]:
    """This step's transform (uniform over `equivariance_transforms`) and whether the term trains on it.

    Seeded by (seed, step) alone, so every DDP rank draws the same and a resumed run redraws the same.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, step))
    transforms = equivariance_transforms(cfg.scales, cfg.rotations)
    transform = transforms[int(torch.randint(len(transforms), (1,), generator=generator))]
    trains = bool(torch.rand((), generator=generator) < cfg.probability)
    return transform, trains


def equivariance_loss(
    decode: Callable[[Tensor], Tensor], z: Tensor, images: Tensor, transform: SpatialTransform, kind: str
) -> Tensor:
    """Reconstruction loss (`kind` l1 | l2) between decode(T z) and T images; gradients reach z and decode."""
    decoded = decode(transform(z))  # (B, 3, s h f, s w f)
    target = transform(images)  # (B, 3, s H, s W)
    if decoded.shape != target.shape:
        raise ValueError(f"{transform.name}: the decoder gave {tuple(decoded.shape)} for the transformed latent, "
                         f"but the transformed images are {tuple(target.shape)}")
    return reconstruction_loss(target, decoded, kind)


@torch.no_grad()
def equivariance_error(
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    images: Tensor,
    scales: list[float],
    rotations: bool = True,
    kind: str = "l2",
) -> dict[str, float]:
    """How far an autoencoder is from equivariant under each transform T (no training).

    `encode` maps images to the latents `decode` reads (e.g. the KL mean, the quantised VQ latent).
    Returns, averaged over the transforms and per transform as `<key>/<T.name>`:
    - `decoder_error`: reconstruction loss (`kind`) between decode(T E(x)) and T x;
    - `encoder_error`: ||E(T x) - T E(x)|| / ||T E(x)|| over the batch (relative to the transformed latent,
      so a downscaled latent's smaller norm does not shrink it);
    and `reconstruction_error`, the same loss for decode(E(x)) against x, the untransformed baseline.
    """
    transforms = equivariance_transforms(scales, rotations)
    if not transforms:
        raise ValueError("equivariance_error needs at least one transform: give scales or rotations=True")
    z = encode(images)
    metrics = {"reconstruction_error": float(reconstruction_loss(images, decode(z), kind))}
    for transform in transforms:
        transformed_z = transform(z)
        encoded = encode(transform(images))
        if encoded.shape != transformed_z.shape:
            raise ValueError(f"{transform.name}: E(T x) is {tuple(encoded.shape)}, "
                             f"T E(x) is {tuple(transformed_z.shape)}")
        metrics[f"decoder_error/{transform.name}"] = float(equivariance_loss(decode, z, images, transform, kind))
        relative = (encoded - transformed_z).norm() / transformed_z.norm().clamp_min(1e-12)
        metrics[f"encoder_error/{transform.name}"] = float(relative)
    for key in ("decoder_error", "encoder_error"):
        metrics[key] = sum(metrics[f"{key}/{t.name}"] for t in transforms) / len(transforms)
    return metrics


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
