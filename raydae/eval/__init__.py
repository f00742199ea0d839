"""Evaluation: distances between feature sets, a seeded random feature net, and model complexity.

Plain PyTorch + numpy; which feature network made the features decides a metric's name
(`fd_randfeat` on `RandomFeatureNet` features is not FID).
"""

from __future__ import annotations

from raydae.eval.complexity import (
    conv_spectral_norm,
    empirical_lipschitz,
    flops_per_image,
    linear_spectral_norm,
    lipschitz_blockers,
    lipschitz_upper_bound,
)
from raydae.eval.distances import (
    feature_statistics,
    frechet_distance,
    frechet_from_statistics,
    kernel_distance,
    precision_recall,
)
from raydae.eval.features import RandomFeatureNet

__all__ = [
    "RandomFeatureNet",
    "conv_spectral_norm",
    "empirical_lipschitz",
    "feature_statistics",
    "flops_per_image",
    "frechet_distance",
    "frechet_from_statistics",
    "kernel_distance",
    "linear_spectral_norm",
    "lipschitz_blockers",
    "lipschitz_upper_bound",
    "precision_recall",
]
