"""Autoregressive prior over VQ code indices: a decoder-only, pre-LayerNorm transformer (VQGAN stage 2).

The codes of one image are read in raster order, (h, w) -> a sequence of h * w indices, and the
prior learns p(index_i | index_<i, class). Position i of the input holds a start token (i = 0) or
the previous index; logits[:, i] predict indices[:, i], so training is plain next-token
cross-entropy over the whole sequence.

- Class-conditional (`num_classes > 0`): the start token is a class embedding. Index `num_classes`
  is a learned "null" class, so the same model also samples unconditionally (and can drop labels
  during training for classifier-free guidance).
- Unconditional (`num_classes == 0`): the start token is one learned vector.

Sampling keeps a key/value cache: each step feeds one token and appends its keys and values per
layer, so a sequence of length L costs L single-token passes instead of L growing prefixes.
`use_cache=False` re-runs the full prefix each step; both paths give the same logits (tested).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from raydae.errors import UserError

KVCache = list[tuple[Tensor, Tensor] | None]  # per layer: keys and values so far, (B, heads, T, head_dim)


# ----------------------------------------------------------------------------------- sampling filters
def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set the logits outside the top-k / nucleus (top-p) set to -inf, along the last dimension.

    `top_k=0` and `top_p=1.0` switch a filter off. Top-k keeps the k largest logits; entries that tie
    exactly with the k-th largest are kept too (dropping some of a tie would be an arbitrary choice
    among equally likely tokens). Top-p keeps the smallest set of most likely tokens whose
    probabilities sum to at least `top_p`, and always at least the most likely one. Top-k runs first.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
        remove_sorted = mass_before >= top_p  # the set already reached top_p without this token
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


# ----------------------------------------------------------------------------------- blocks
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache[layer] is not None:
                past_k, past_v = cache[layer]
                past = past_k.shape[2]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache[layer] = (k, v)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif t == 1:  # one new token attends to everything cached before it: no mask needed
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # several new tokens after a cached prefix: query i sees keys up to past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b, t, width)
        return self.resid_dropout(self.proj(out))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------- the prior
class CodePrior(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        depth: int,
        width: int,
        heads: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        # Kept so a checkpoint can rebuild the model alone: CodePrior(**prior.config).
        self.config = dict(
            vocab_size=vocab_size, seq_len=seq_len, depth=depth, width=width, heads=heads,
            mlp_ratio=mlp_ratio, dropout=dropout, num_classes=num_classes,
        )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_classes = num_classes

        self.token_embed = nn.Embedding(vocab_size, width)
        if num_classes > 0:
            self.class_embed = nn.Embedding(num_classes + 1, width)  # last row: the null class
        else:
            self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, width))
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)  # untied, as in taming's minGPT
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        if num_classes == 0:
            nn.init.normal_(self.start_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 / minGPT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ inputs
    def _labels(self, y: Tensor | int | None, batch: int, device: torch.device) -> Tensor | None:
        """Labels as a (B,) long tensor; None means the null class for a conditional prior."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this prior is unconditional (num_classes=0) but class labels were given")
            return None
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(y, dtype=torch.long, device=device)
        if y.dim() == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"class labels must have shape ({batch},), got {tuple(y.shape)}")
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = null)")
        return y

    def _start(self, batch: int, y: Tensor | None) -> Tensor:
        """Start token at input position 0, (B, 1, width)."""
        if y is None:
            return self.start_token.expand(batch, -1, -1)
        return self.class_embed(y)[:, None, :]

    def _check_indices(self, indices: Tensor) -> None:
        if indices.dim() != 2 or indices.dtype != torch.long:
            raise ValueError(f"indices must be (B, L) long, got {tuple(indices.shape)} {indices.dtype}")
        if indices.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {indices.shape[1]} exceeds the prior's seq_len {self.seq_len}")

    def _embed_prefix(self, prefix: Tensor, y: Tensor | None) -> Tensor:
        """Inputs [start, prefix_0, ..., prefix_{P-1}] with positions 0..P, (B, P + 1, width)."""
        x = torch.cat([self._start(prefix.shape[0], y), self.token_embed(prefix)], dim=1)
        return self.embed_dropout(x + self.pos_embed[:, : x.shape[1]])

    def _logits(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self.head(self.norm(x))

    # ------------------------------------------------------------------ training
    def forward(self, indices: Tensor, y: Tensor | int | None = None) -> Tensor:
        """Code indices (B, L) -> logits (B, L, vocab_size); logits[:, i] predict indices[:, i]."""
        self._check_indices(indices)
        labels = self._labels(y, indices.shape[0], indices.device)
        return self._logits(self._embed_prefix(indices[:, :-1], labels))

    def loss(self, indices: Tensor, y: Tensor | int | None = None) -> Tensor:
        """Mean next-token cross-entropy (nats per code), computed in float32."""
        logits = self(indices, y)
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), indices.reshape(-1))

    # ------------------------------------------------------------------ cached inference
    def _step(
        self, prev: Tensor | None, labels: Tensor | None, position: int, cache: KVCache, batch: int
    ) -> Tensor:
        """Feed input `position` through the cache: the start token at 0, else the previous index
        `prev` (B,). Returns the logits for the code at that position, (B, vocab_size)."""
        x = self._start(batch, labels) if position == 0 else self.token_embed(prev)[:, None, :]
        x = self.embed_dropout(x + self.pos_embed[:, position : position + 1])
        return self._logits(x, cache)[:, -1]

    def new_cache(self) -> KVCache:
        return [None] * len(self.blocks)

    @torch.no_grad()
    def step_logits(self, indices: Tensor, y: Tensor | int | None = None) -> Tensor:
        """The logits of `forward`, computed one position at a time through the key/value cache."""
        self._check_indices(indices)
        batch = indices.shape[0]
        labels = self._labels(y, batch, indices.device)
        cache = self.new_cache()
        steps = []
        for position in range(indices.shape[1]):
            prev = indices[:, position - 1] if position > 0 else None
            steps.append(self._step(prev, labels, position, cache, batch))
        return torch.stack(steps, dim=1)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        y: Tensor | int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Sample `n` code sequences, (n, seq_len) long, in raster order.

        `temperature=0` takes the argmax at every step (greedy). Dropout stays as the module's mode
        says: call `.eval()` first. `device`, if given, must be the prior's. The generator may live on
        any device: the random draws are made there and moved, so a CPU generator gives the same draws
        whichever device the prior runs on.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        own = self.pos_embed.device
        device = torch.device(device) if device is not None else own
        if device.type != own.type or device.index not in (None, own.index):
            raise ValueError(f"generate(device={device}) but the prior's weights are on {own}; move the prior first")
        labels = self._labels(y, n, device)
        out = torch.zeros(n, self.seq_len, dtype=torch.long, device=device)
        cache = self.new_cache() if use_cache else None
        for position in range(self.seq_len):
            if cache is not None:
                prev = out[:, position - 1] if position > 0 else None
                logits = self._step(prev, labels, position, cache, n)
            else:
                logits = self._logits(self._embed_prefix(out[:, :position], labels))[:, -1]
            out[:, position] = self._sample(logits.float(), temperature, top_k, top_p, generator)
        return out

    @staticmethod
    def _sample(
        logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
    ) -> Tensor:
        """One code per row: argmax when greedy, else a Gumbel-max draw from softmax(filtered logits)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        scaled = filter_logits(logits / temperature, top_k, top_p)
        # Uniforms come from the generator's own device (CUDA refuses a CPU generator): the same codes for
        # a seed on any device, at the cost of one (B, vocab) host-to-device copy per step.
        draw_device = generator.device if generator is not None else logits.device
        uniform = torch.rand(logits.shape, generator=generator, device=draw_device).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform))  # uniform = 0 gives -inf: that code is simply not picked
        return (scaled + gumbel).argmax(dim=-1)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, seq_len={self.seq_len}, num_classes={self.num_classes}"


# ----------------------------------------------------------------------------------- sizes
# Tiny sizes run on a laptop CPU. The large ones are the GPT-2 / minGPT shapes that
# taming-transformers' VQGAN transformers use:
# - prior-B: 12 layers, 768 wide, 12 heads: minGPT's "GPT-1 like" config (taming's mingpt.py).
# - prior-L: 24 layers, 1024 wide, 16 heads: GPT-2 medium.
# - prior-XL: 48 layers, 1536 wide, 24 heads: taming's class-conditional ImageNet transformer
#   (~1.4B parameters in the paper). Recalled from the paper, not verified against its config file.
def prior_T(**kwargs) -> CodePrior:
    return CodePrior(depth=2, width=64, heads=2, **kwargs)


def prior_S(**kwargs) -> CodePrior:
    return CodePrior(depth=4, width=128, heads=4, **kwargs)


def prior_B(**kwargs) -> CodePrior:
    return CodePrior(depth=12, width=768, heads=12, **kwargs)


def prior_L(**kwargs) -> CodePrior:
    return CodePrior(depth=24, width=1024, heads=16, **kwargs)


def prior_XL(**kwargs) -> CodePrior:
    return CodePrior(depth=48, width=1536, heads=24, **kwargs)


PRIOR_MODELS: dict[str, Callable[..., CodePrior]] = {
    "prior-T": prior_T,
    "prior-S": prior_S,
    "prior-B": prior_B,
    "prior-L": prior_L,
    "prior-XL": prior_XL,
}


def build_prior(
    name: str, vocab_size: int, seq_len: int, num_classes: int = 0, dropout: float = 0.0
) -> CodePrior:
    if name not in PRIOR_MODELS:
        raise UserError(f"unknown prior model {name!r}; choose one of {', '.join(PRIOR_MODELS)}")
    return PRIOR_MODELS[name](
        vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes, dropout=dropout
    )
