"""The Inception network behind FID, KID and IS, from a local file only (never downloaded at run time).

The network is torchmetrics' `NoTrainInceptionV3`, torch-fidelity's port of the TF Inception that
published FIDs use. Its weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`; torch
hub names files `<name>-<first 8 hex digits of the SHA-256>.pth`, and we check the same prefix (or a
full hash the user pins with `eval.inception_sha256`).

Images are resized to 299x299 with torch-fidelity's TF1-compatible bilinear interpolation (torchmetrics'
`antialias=False`): that is the resize published FIDs were computed with; torchmetrics' default
(antialiased) gives different numbers.
"""

from __future__ import annotations

import hashlib
import os

import torch

from raydae.errors import UserError
from raydae.pixels import uint8_pixels

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
RESIZE = "299x299, TF1-compatible bilinear (torch-fidelity; torchmetrics antialias=False), as published FIDs"
FEATURE_DIM = 2048


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_cache_path() -> str:
    """Where torch hub (and so torchmetrics, when it may download) keeps the file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def resolve_inception_weights(path: str, expected_sha256: str = "") -> str | None:
    """The verified local weights file: `path` when given (an error if missing or of another hash),
    else torch hub's cached copy when present, else None (the caller falls back to random features)."""
    given = bool(path)
    candidate = os.path.abspath(os.path.expanduser(path)) if given else hub_cache_path()
    if not os.path.isfile(candidate):
        if given:
            raise UserError(
                f"eval.inception_weights={path}: no such file; give the local copy of {INCEPTION_FILE} "
                "(torch-fidelity's Inception weights), or leave it empty to score with random-network features"
            )
        return None
    actual = sha256_of(candidate)
    wanted = expected_sha256.lower() or INCEPTION_SHA256_PREFIX
    if not actual.startswith(wanted):
        raise UserError(
            f"eval.inception_weights={candidate}: SHA-256 {actual[:16]}... does not match the expected "
            f"{wanted[:16]}...; this is not {INCEPTION_FILE} (FID from other weights would not be comparable)"
        )
    return candidate


class InceptionFeatures(torch.nn.Module):
    """(N, 3, H, W) images in [-1, 1] -> 2048 pool features and the 1008 unbiased logits (for IS)."""

    def __init__(self, weights_path: str):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise UserError(f"FID needs torchmetrics' image extras ({err}); pip install 'raydae[fid]'") from None
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(FEATURE_DIM), "logits_unbiased"],
                feature_extractor_weights_path=weights_path, antialias=False,
            )
        except ModuleNotFoundError:
            raise UserError("eval.inception_weights is set but torch-fidelity (which provides the Inception "
                            "network) is not installed; pip install 'raydae[fid]'") from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(uint8_pixels(images))
        return pool.float(), logits.float()


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` folds (torch-fidelity's definition)."""
    probs = logits.double().softmax(dim=1)
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(dim=1).mean()
        scores.append(kl.exp().item())
    tensor = torch.tensor(scores, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std(unbiased=True)) if len(scores) > 1 else 0.0
