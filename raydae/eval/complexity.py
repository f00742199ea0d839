"""How heavy and how smooth a network is: forward FLOPs per image and Lipschitz constants.

`lipschitz_upper_bound` multiplies per-layer constants, which bounds a *sequential* composition;
`empirical_lipschitz` measures finite-difference ratios around given latents, a lower estimate.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Exact Lipschitz constants of elementwise activations (max |derivative|). SiLU and GELU are
# slightly above 1 (their derivatives overshoot), so they are not treated as 1-Lipschitz.
_ACTIVATION_LIPSCHITZ = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Tanh: 1.0,
    nn.Hardtanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.SiLU: 1.0999,  # max of σ(x)(1 + x(1 − σ(x))) ≈ 1.09984, rounded up
    nn.GELU: 1.1290,  # ≈ 1.12890, rounded up
}
_IDENTITY_LIKE = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout)
_NORMALISATIONS = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs, by `FlopCounterMode` (matmuls, convolutions, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(model: nn.Module, example_input: torch.Tensor) -> int:
    """Forward FLOPs for one image, counted by `torch.utils.flop_counter.FlopCounterMode`.

    `example_input` carries a batch dimension; the total is divided by the batch size. Torch counts
    a multiply-add as 2 FLOPs (a Conv2d costs 2·Cin·Cout·k²·H_out·W_out), and only counts ops it
    has formulas for (matmuls, convolutions, attention), not elementwise ops or norms.
    """
    return count_flops(lambda: model(example_input)) // example_input.shape[0]


# ---------------------------------------------------------------- Lipschitz upper bound


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def lipschitz_blockers(module: nn.Module) -> list[str]:
    """Reasons why `lipschitz_upper_bound` cannot bound `module` (empty when it can)."""
    reasons = []
    for name, leaf in module.named_modules():
        if list(leaf.children()):
            continue
        if isinstance(leaf, _NORMALISATIONS):
            reasons.append(
                f"{name or type(leaf).__name__}: {type(leaf).__name__} divides by a data-dependent "
                "standard deviation, so it is not globally Lipschitz"
            )
        elif isinstance(leaf, nn.Conv2d) and leaf.padding_mode != "zeros":
            reasons.append(f"{name}: Conv2d padding_mode={leaf.padding_mode!r} is not supported")
        elif not isinstance(leaf, (nn.Linear, nn.Conv2d, nn.LeakyReLU, *_IDENTITY_LIKE, *_ACTIVATION_LIPSCHITZ)):
            reasons.append(f"{name or type(leaf).__name__}: no Lipschitz constant known for {type(leaf).__name__}")
    return reasons


def linear_spectral_norm(layer: nn.Linear) -> float:
    """Exact largest singular value of the weight."""
    return torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()


def conv_spectral_norm(conv: nn.Conv2d, input_shape: tuple[int, ...], iterations: int = 100, seed: int = 0) -> float:
    """Operator norm of `conv` (bias ignored) on inputs of `input_shape` = (C, H, W), by power iteration.

    Each step applies the conv and then its adjoint, the conv_transpose with the same stride,
    padding, dilation and groups (taken through autograd, so output sizes always match). Power
    iteration approaches the norm from below; 100 steps are plenty for small layers.
    """
    weight = conv.weight.detach().double()

    def apply(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *input_shape), generator=generator, dtype=torch.float64).to(weight.device)  # CPU seed, any device
    for _ in range(iterations):
        x = (x / x.norm()).requires_grad_(True)
        y = apply(x)
        (x,) = torch.autograd.grad(y, x, grad_outputs=y.detach())  # adjoint: conv_transpose(conv(x))
    x = x / x.norm()
    with torch.no_grad():
        return apply(x).norm().item()


def _conv_input_shapes(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[nn.Module], dict]:
    """Leaves in the order the forward pass calls them, and each Conv2d's (C, H, W) input shape."""
    order: list[nn.Module] = []
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(leaf, inputs):
        order.append(leaf)
        shapes.setdefault(leaf, tuple(inputs[0].shape[1:]))

    handles = [leaf.register_forward_pre_hook(hook) for leaf in _leaves(module)]
    try:
        param = next(module.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            module(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order, shapes


def lipschitz_upper_bound(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> float | None:
    """Product of per-layer Lipschitz constants (L2 norm), in forward order.

    Linear: exact largest singular value. Conv2d: operator norm on the input shape that layer sees,
    by power iteration (needs `input_shape`, the (C, H, W) or (D,) of one input without batch; with
    it, the forward order is taken from a dry run). ReLU, LeakyReLU (|slope| ≤ 1), Tanh: 1; SiLU
    and GELU: their true constants (≈1.0998 and ≈1.1289, rounded up).

    This bounds a *sequential* composition only; a residual branch `x + f(x)` is not seen.
    Returns None (with a warning naming the reason, see `lipschitz_blockers`) when the module
    holds a GroupNorm or other normalisation: dividing by a data-dependent standard deviation
    is not globally Lipschitz, so any product would not be a true bound.
    """
    reasons = lipschitz_blockers(module)
    if reasons:
        warnings.warn("no Lipschitz upper bound: " + "; ".join(reasons), stacklevel=2)
        return None
    if input_shape is not None:
        order, shapes = _conv_input_shapes(module, tuple(input_shape))
    else:
        order, shapes = _leaves(module), {}
        if any(isinstance(leaf, nn.Conv2d) for leaf in order):
            raise ValueError("module contains Conv2d layers; pass input_shape=(C, H, W) to bound them")
    bound = 1.0
    for leaf in order:
        if isinstance(leaf, nn.Linear):
            bound *= linear_spectral_norm(leaf)
        elif isinstance(leaf, nn.Conv2d):
            bound *= conv_spectral_norm(leaf, shapes[leaf])
        elif isinstance(leaf, nn.LeakyReLU):
            bound *= max(1.0, abs(leaf.negative_slope))
        elif type(leaf) in _ACTIVATION_LIPSCHITZ:
            bound *= _ACTIVATION_LIPSCHITZ[type(leaf)]
    return bound


def spectral_norm_product(module: nn.Module, input_shape: tuple[int, ...], iterations: int = 50) -> float:
    """Product of the operator norms of the Conv2d and Linear layers, in the order the forward calls them.

    The same product `lipschitz_upper_bound` takes, without its refusal: for a network with GroupNorm or
    residual branches it is a measure of how much the layers can stretch their inputs (a complexity
    proxy that is comparable between decoders of one architecture), not a bound on the Lipschitz constant.
    """
    order, shapes = _conv_input_shapes(module, tuple(input_shape))
    product = 1.0
    for leaf in order:
        if isinstance(leaf, nn.Linear):
            product *= linear_spectral_norm(leaf)
        elif isinstance(leaf, nn.Conv2d):
            product *= conv_spectral_norm(leaf, shapes[leaf], iterations=iterations)
    return product


# ---------------------------------------------------------------- empirical estimate


@torch.no_grad()
def empirical_lipschitz(fn, latents: torch.Tensor, eps: float = 1e-3, trials: int = 8, seed: int = 0) -> float:
    """Largest ||fn(z + δ) − fn(z)|| / ||δ|| over `trials` random δ of norm `eps` per latent.

    A lower estimate of the local Lipschitz constant around `latents` (N, ...); δ is drawn from a
    local generator seeded with `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    base = fn(latents)
    best = 0.0
    for _ in range(trials):
        delta = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (latents.ndim - 1))
        change = (fn(latents + delta) - base).flatten(1).norm(dim=1)
        best = max(best, (change / delta.flatten(1).norm(dim=1)).max().item())
    return best
