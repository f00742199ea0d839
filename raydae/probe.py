"""The sample probe: a small, fixed-noise sample of a training generator, scored against real images.

At every checkpoint rank 0 draws `generator_train.probe_samples` samples from the EMA weights with fixed
noise and few DDIM steps, decodes them with the run's final decoder and reports their Fréchet distance
(`probe/fd`) to the real images' statistics in the evaluation's headline feature space; its cost is
`probe/seconds`. The same noise, count and reference for every trial make the number comparable across
latent shapes, which a generator's loss is not (docs/architecture.md, "Sweeps prune on samples").

`reference_from_features` builds what `SampleProbe` needs from the real features that `scoring.real_reference`
prepares on the driver. Only the feature spaces (`eval/spaces.py`) are imported here: this runs on a worker.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from raydae.eval.distances import feature_statistics, frechet_from_statistics
from raydae.eval.spaces import Embedder, FeatureSpec, headline_space

PROBE_SEED = 424242  # fixed noise: every checkpoint of every trial draws the same starting latents
# A diverged generator's samples are not finite and have no Fréchet distance. ASHA needs an ordering (an
# infinite value makes its percentile cutoff NaN, which stops nothing), so they score this, the worst value.
DIVERGED_FD = 1e9


def probe_metric_name(space: str) -> str:
    return f"probe/fd_{space}"


class SampleProbe:
    """Scores a generator task's samples against fixed real statistics (one feature space)."""

    def __init__(self, reference: dict, num_samples: int, sample_steps: int, batch_size: int = 256):
        self.spec: FeatureSpec = reference["spec"]
        self.space: str = reference["space"]
        self.mu, self.sigma = reference["mu"], reference["sigma"]
        self.num_samples, self.sample_steps, self.batch_size = num_samples, sample_steps, batch_size
        self.embedder: Embedder | None = None

    @torch.no_grad()
    def __call__(self, task) -> dict[str, float]:
        started = time.perf_counter()
        device = next(task.generator_module.parameters()).device
        if self.embedder is None:
            self.embedder = Embedder(self.spec, device)
        features = []
        for start in range(0, self.num_samples, self.batch_size):
            n = min(self.batch_size, self.num_samples - start)
            labels = None
            if task.conditional:  # the same balanced class mix at every checkpoint
                labels = torch.arange(start, start + n, device=device) % task.latent_facts["num_classes"]
            images = task.sample(n, seed=PROBE_SEED + start, steps=self.sample_steps, labels=labels)
            features.append(self.embedder(images)[self.space])
        fd = _frechet_or_diverged(np.concatenate(features), self.mu, self.sigma)
        return {"probe/fd": fd, probe_metric_name(self.space): fd, "probe/diverged": float(fd >= DIVERGED_FD),
                "probe/seconds": time.perf_counter() - started}


def _frechet_or_diverged(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    if not np.isfinite(features).all():
        return DIVERGED_FD
    try:
        fd = frechet_from_statistics(*feature_statistics(features), mu, sigma)
    except np.linalg.LinAlgError:  # a degenerate covariance whose eigenvalues do not converge
        return DIVERGED_FD
    return fd if np.isfinite(fd) else DIVERGED_FD


def reference_from_features(spec: FeatureSpec, real: dict[str, np.ndarray]) -> dict:
    """What `SampleProbe` needs, from the real images' features in every space of `spec`."""
    space = headline_space(spec.spaces)
    mu, sigma = feature_statistics(real[space])
    return {"spec": spec, "space": space, "mu": mu, "sigma": sigma}
