"""Distances between two sets of feature vectors: Fréchet, kernel (KID-style) and precision/recall.

Each takes plain `(N, D)` arrays or tensors; which network made the features is the caller's
business (see `features.py`), and decides the metric's name.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(feats) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {array.shape}")
    return array


# ---------------------------------------------------------------- Fréchet distance


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `(N, D)` features, in float64."""
    array = _as_float64(feats)
    if array.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½).

    tr((S1 S2)^½) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S1^½ S2 S1^½ (same spectrum as S1 S2), so no non-symmetric sqrtm is needed and
    round-off can only produce tiny negative eigenvalues, which are clamped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    sqrt_sigma1 = _symmetric_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's)."""
    return frechet_from_statistics(*feature_statistics(feats_a), *feature_statistics(feats_b))


# ---------------------------------------------------------------- kernel distance (KID)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_distance(feats_a, feats_b, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² with the cubic kernel (x·y/d + 1)³, averaged over random subsets: (mean, std).

    The subset size is clipped to half the smaller set (at least 2), so that subsets differ and the std says
    how much the estimate moves: a subset as large as a set would be that whole set every time. Subsets are
    drawn without replacement inside each subset, from a local generator so the answer depends only on `seed`.
    """
    a = torch.from_numpy(_as_float64(feats_a))
    b = torch.from_numpy(_as_float64(feats_b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    smaller = min(a.shape[0], b.shape[0])
    if smaller < 2 or subset_size < 2:
        raise ValueError(f"need at least 2 samples per set and subset, got {smaller} and {subset_size}")
    m = min(subset_size, max(2, smaller // 2))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        values.append(unbiased_mmd2(x, y))
    return float(np.mean(values)), float(np.std(values))


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """MMD² between two equal-size sets with the cubic kernel; k(x, x) is left out within a set (unbiased)."""
    m = x.shape[0]
    off_diagonal = 1.0 - torch.eye(m, dtype=x.dtype)
    k_xx = (_polynomial_kernel(x, x) * off_diagonal).sum() / (m * (m - 1))
    k_yy = (_polynomial_kernel(y, y) * off_diagonal).sum() / (m * (m - 1))
    return (k_xx + k_yy - 2.0 * _polynomial_kernel(x, y).mean()).item()


# ---------------------------------------------------------------- precision / recall


def _knn_radii(feats: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for chunk in feats.split(chunk_size):
        distances = torch.cdist(chunk, feats)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself
    return torch.cat(radii)


def _covered_fraction(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    covered = 0
    for chunk in queries.split(chunk_size):
        inside = torch.cdist(chunk, centres) <= radii.unsqueeze(0)
        covered += int(inside.any(dim=1).sum())
    return covered / queries.shape[0]


def precision_recall(real, fake, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour. Precision: fraction of fake points inside the real manifold (fidelity);
    recall: fraction of real points inside the fake manifold (coverage). Distances are computed in
    chunks of `chunk_size` rows, so memory is O(chunk_size · N).
    """
    real_t = torch.from_numpy(_as_float64(real))
    fake_t = torch.from_numpy(_as_float64(fake))
    if min(real_t.shape[0], fake_t.shape[0]) <= k:
        raise ValueError(f"each set needs more than k={k} points")
    real_radii = _knn_radii(real_t, k, chunk_size)
    fake_radii = _knn_radii(fake_t, k, chunk_size)
    precision = _covered_fraction(fake_t, real_t, real_radii, chunk_size)
    recall = _covered_fraction(real_t, fake_t, fake_radii, chunk_size)
    return precision, recall
