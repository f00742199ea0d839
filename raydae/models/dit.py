"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023) over latents.

The network maps a noisy latent x_t (B, C, H, W), its timestep t and an optional class label y to a
tensor of the same shape: the predicted noise (eps) or velocity (v), depending on how
`raydae.diffusion.GaussianDiffusion` is configured. Unlike the paper there are no learned-sigma
channels, because raydae samples with a fixed-variance DDIM sampler.

Conditioning (timestep + label) enters every block through adaLN-Zero: it regresses a per-channel
shift, scale and gate, and the gates start at zero so every block starts as the identity.

Plain PyTorch; no Ray.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from raydae.errors import UserError


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: one (shift, scale) per sample and channel, broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------- embedders: t and y


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequency features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(B,) timesteps, integer or fractional -> (B, dim) [cos | sin] features (as in DDPM / GLIDE)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra "null" row (index `num_classes`) for classifier-free guidance.

    The null row is always allocated, even with `dropout_prob=0`, so a model trained without label
    dropout still has a (untrained) null class and `forward_with_cfg` runs; guidance from it is only
    meaningful if the model was trained with dropout > 0.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Replace labels by the null class: at random with `dropout_prob` in training mode, or exactly
        where `force_drop_ids` is nonzero (any mode; it then replaces the random draw)."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(labels.device).bool()
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        return self.embedding_table(self.token_drop(labels, force_drop_ids))


# --------------------------------------------------------------------------- core blocks


class Attention(nn.Module):
    """Multi-head self-attention; `scaled_dot_product_attention` picks a flash / memory-efficient kernel."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # tanh GELU as in the paper's ViT blocks


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # No affine parameters in the norms: the per-sample shift/scale from adaLN replaces them.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map from each token to its p*p*C patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- the model


class DiT(nn.Module):
    """Diffusion Transformer over latents (B, in_channels, H, W) -> same shape.

    `num_classes=0` builds an unconditional model (no label embedder). `input_size` is the latent's
    spatial size, an int for square latents or (H, W); it fixes the positional embedding, so the model
    only accepts that size.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        # Checked first, before any weights are allocated, so `build_dit` can turn it into a UserError cheaply.
        if height % patch_size or width % patch_size:
            raise ValueError(f"input size {height}x{width} is not divisible by patch size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
        self.input_size = (height, width)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels  # eps or v only; no learned-sigma channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.activation_checkpointing = False  # set by the generator task from dit.activation_checkpointing
        self.grid_size = (height // patch_size, width // patch_size)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed, not learned (as in the paper): a non-persistent buffer, so it follows .to(device) but is
        # rebuilt from the config rather than stored in every checkpoint.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.grid_size)
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding initialised like a linear layer on the flattened patch (as in ViT/MAE).
        weight = self.x_embedder.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zeroing the modulation layers makes every gate 0, so each residual block starts as
        # the identity, and zeroing the final layer makes the network output exactly 0 at init. The paper
        # found this clearly better than adaLN without the zero init or cross-attention conditioning
        # (lower FID, steadier early training), the same trick as zero-init residual branches in ResNets.
        # Gradients still flow: the final linear's weight gradient is its (nonzero) input activations.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W)."""
        p, channels = self.patch_size, self.out_channels
        grid_h, grid_w = self.grid_size
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], channels, grid_h * p, grid_w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, force_drop_ids: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy latents; t: (B,) timesteps; y: (B,) int labels, required iff num_classes > 0.

        An unconditional model ignores `y`, so a training loop can pass dataset labels either way.
        """
        expected = (self.in_channels, *self.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT was built for latents (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(f"this DiT is class-conditional ({self.num_classes} classes) and needs labels y")
            c = c + self.y_embedder(y, force_drop_ids)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input; backward recomputes the rest (~1/3 more compute, a fraction
                # of the activation memory: how DiT-XL/2 at batch 256 fits on one 80 GB GPU).
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: uncond + cfg_scale * (cond - uncond), both halves in one batch.

        Applied to the whole output (all of it is eps or v; there are no sigma channels to leave alone).
        `force_drop_ids` marks the second half null, which also stops random label dropout from touching
        the conditional half should the model still be in training mode.
        """
        if self.y_embedder is None:
            raise ValueError("forward_with_cfg needs a class-conditional DiT (num_classes > 0)")
        batch = x.shape[0]
        drop = torch.arange(2 * batch, device=x.device) >= batch  # False for the first (conditional) half
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop_ids=drop)
        cond, uncond = out.split(batch, dim=0)
        return uncond + cfg_scale * (cond - uncond)


# --------------------------------------------------------------------------- fixed 2-D sin-cos positional embedding


def get_1d_sincos_pos_embed(embed_dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, embed_dim) [sin | cos] features, computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int]) -> Tensor:
    """(grid_h * grid_w, embed_dim) float32, row-major like the patch tokens: half the channels encode the
    row, half the column (MAE / DiT)."""
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    return torch.cat([emb_rows, emb_cols], dim=1).float()


# --------------------------------------------------------------------------- sizes
# The paper's family (S/B/L/XL x patch 2/4/8), plus tiny widths that train on a CPU for tests and smoke
# runs. Tiny sizes use patches 1/2/4 because DAE latents are small (8x8 or 16x16): patch 8 would leave
# one or four tokens. Adding a size is one line.


def DiT_XL_2(**kwargs) -> DiT: return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs) -> DiT: return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_XL_8(**kwargs) -> DiT: return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def DiT_L_2(**kwargs) -> DiT: return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs) -> DiT: return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_L_8(**kwargs) -> DiT: return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def DiT_B_2(**kwargs) -> DiT: return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs) -> DiT: return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_B_8(**kwargs) -> DiT: return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def DiT_S_2(**kwargs) -> DiT: return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs) -> DiT: return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def DiT_S_8(**kwargs) -> DiT: return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
def DiT_XS_1(**kwargs) -> DiT: return DiT(depth=6, hidden_size=192, patch_size=1, num_heads=3, **kwargs)
def DiT_XS_2(**kwargs) -> DiT: return DiT(depth=6, hidden_size=192, patch_size=2, num_heads=3, **kwargs)
def DiT_XS_4(**kwargs) -> DiT: return DiT(depth=6, hidden_size=192, patch_size=4, num_heads=3, **kwargs)
def DiT_T_1(**kwargs) -> DiT: return DiT(depth=4, hidden_size=128, patch_size=1, num_heads=4, **kwargs)
def DiT_T_2(**kwargs) -> DiT: return DiT(depth=4, hidden_size=128, patch_size=2, num_heads=4, **kwargs)
def DiT_T_4(**kwargs) -> DiT: return DiT(depth=4, hidden_size=128, patch_size=4, num_heads=4, **kwargs)


DIT_MODELS: dict[str, Callable[..., DiT]] = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-XS/1": DiT_XS_1, "DiT-XS/2": DiT_XS_2, "DiT-XS/4": DiT_XS_4,
    "DiT-T/1": DiT_T_1, "DiT-T/2": DiT_T_2, "DiT-T/4": DiT_T_4,
}  # fmt: skip


def build_dit(
    name: str,
    input_size: int | tuple[int, int],
    in_channels: int,
    num_classes: int = 0,
    class_dropout_prob: float = 0.1,
) -> DiT:
    """Build a registry size for latents (B, in_channels, input_size...); `num_classes=0` is unconditional."""
    if name not in DIT_MODELS:
        raise UserError(f"unknown DiT model {name!r}; choose one of: {', '.join(DIT_MODELS)}")
    try:
        return DIT_MODELS[name](
            input_size=input_size,
            in_channels=in_channels,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        )
    except ValueError as err:  # bad sizes are caught before any weights are allocated
        raise UserError(f"{name}: {err}; pick a DiT with a smaller patch or a latent size it divides") from err
