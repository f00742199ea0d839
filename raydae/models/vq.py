"""Vector quantiser: nearest-code lookup with a straight-through gradient (VQ-VAE / VQGAN).

Two ways to learn the codebook:
- `ema=True`: exponential moving averages of code usage and of the vectors assigned to each code
  (VQ-VAE-2), with Laplace smoothing. No codebook gradient; the loss is the commitment term only.
- `ema=False`: the codebook is a Parameter trained by the codebook term ||z_q - sg(z)||^2.

Buffers change only in `train()` mode. A frozen quantiser (DAE stage 2) is put in `eval()` and
`requires_grad_(False)`; its codebook then stays exactly as it was.

Under torch.distributed (DDP) the batch statistics are all-reduced and re-seeded codes are
broadcast from rank 0, so every rank keeps an identical codebook without relying on DDP's
buffer broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from raydae.models.bottleneck import BottleneckOutput


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """How often each code was picked, as floats. (`torch.bincount` reads its maximum back to the host on a
    GPU, a sync at every step; the size is known here.)"""
    return torch.zeros(codebook_size, device=indices.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 0.25,
        ema: bool = True,
        ema_decay: float = 0.99,
        l2_normalize: bool = False,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.commitment_weight = commitment_weight
        self.ema = ema
        self.ema_decay = ema_decay
        self.l2_normalize = l2_normalize
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps

        codes = torch.randn(codebook_size, dim)
        if l2_normalize:
            codes = F.normalize(codes, dim=1)
        if ema:
            self.register_buffer("embedding", codes)
            self.register_buffer("embed_sum", codes.clone())  # EMA of summed assigned vectors
        else:
            self.embedding = nn.Parameter(codes)
        # EMA of per-code usage counts; tracked in both modes because dead-code restarts read it.
        # Starting at 1 (not 0) keeps embed_sum / cluster_size == embedding from the first step.
        self.register_buffer("cluster_size", torch.ones(codebook_size))

    # ------------------------------------------------------------------ lookup
    @property
    def codebook(self) -> Tensor:
        """The codes z_q is made of, (codebook_size, dim); unit norm with `l2_normalize`."""
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def _flatten(self, h: Tensor) -> Tensor:
        if h.dim() != 4 or h.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.dim}, h, w), got {tuple(h.shape)}")
        flat = h.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # float32 distances, even under bf16
        return F.normalize(flat, dim=1) if self.l2_normalize else flat

    def _nearest(self, flat: Tensor, codebook: Tensor) -> Tensor:
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
        )
        return distances.argmin(dim=1)

    @torch.no_grad()
    def encode_indices(self, h: Tensor) -> Tensor:
        """Encoder features (B, C, h, w) -> code indices (B, h, w), long. Never updates buffers."""
        flat = self._flatten(h)
        return self._nearest(flat, self.codebook.detach()).view(h.shape[0], h.shape[2], h.shape[3])

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> latents (B, C, h, w)."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ forward
    def forward(self, h: Tensor) -> BottleneckOutput:
        b, _, height, width = h.shape
        flat = self._flatten(h)
        codebook = self.codebook
        indices = self._nearest(flat.detach(), codebook.detach())
        quantized = F.embedding(indices, codebook)

        commitment = F.mse_loss(flat, quantized.detach())
        loss = self.commitment_weight * commitment
        if not self.ema:
            loss = loss + F.mse_loss(quantized, flat.detach())

        if self.training:
            self._update(flat.detach(), indices)

        # Straight-through: the value is exactly z_q, the gradient reaches `flat` unchanged.
        z = quantized.detach() + (flat - flat.detach())
        z = z.view(b, height, width, self.dim).permute(0, 3, 1, 2).contiguous()

        counts = _code_counts(indices, self.codebook_size)
        probs = counts / counts.sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        stats = {
            "perplexity": entropy.exp().detach(),
            "codebook_usage": (counts > 0).float().mean(),
            "commitment": commitment.detach(),
        }
        return BottleneckOutput(z=z, loss=loss, stats=stats, indices=indices.view(b, height, width))

    # ------------------------------------------------------------------ training-time updates
    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor) -> None:
        counts = _code_counts(indices, self.codebook_size)
        sums = torch.zeros_like(self.embedding).index_add_(0, indices, flat) if self.ema else None
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.ema:
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.cluster_size.sum()
            # Laplace smoothing: a code that has gone unused keeps a finite size (no division by 0).
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            codes = self.embed_sum / smoothed[:, None]
            self.embedding.copy_(F.normalize(codes, dim=1) if self.l2_normalize else codes)
        if self.restart_dead_codes:
            self._restart(flat)

    @torch.no_grad()
    def _restart(self, flat: Tensor) -> None:
        """Re-seed codes whose EMA usage fell under the threshold with random vectors of the batch."""
        dead = self.cluster_size < self.dead_code_threshold  # identical on every rank (all-reduced)
        num_dead = int(dead.sum())
        if num_dead == 0 or flat.shape[0] == 0:
            return
        picks = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        samples = flat[picks].contiguous()
        if _distributed():
            dist.broadcast(samples, src=0)
        reset_size = self.dead_code_threshold
        self.embedding.data[dead] = samples
        self.cluster_size[dead] = reset_size  # survives this step; re-seeded again if still unused
        if self.ema:
            self.embed_sum[dead] = samples * reset_size

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, ema={self.ema}, "
            f"l2_normalize={self.l2_normalize}, restart_dead_codes={self.restart_dead_codes}"
        )
