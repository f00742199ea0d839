"""Feature spaces: which networks embed images for evaluation, and the metric names they give.

Plain PyTorch (no Ray): the sample probe runs these on a training worker, evaluation's Ray tasks
(`raydae/scoring_tasks.py`) on their own devices. A distance on random-network features is not FID:
    inception  torchmetrics' Inception from a verified local file      -> fid, kid, is, precision_inception ...
    shapesclf  a classifier the project trains on builtin:shapes        -> fd_shapesclf, kd_shapesclf ...
    dataclf    the same classifier on other data with >= 2 classes      -> fd_dataclf, kd_dataclf ...
    selfsup    a self-supervised net trained on data with fewer classes -> fd_selfsup, kd_selfsup ...
    randfeat   a fixed, seeded random conv net (always; a weak fallback) -> fd_randfeat, kd_randfeat ...
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from raydae.eval.classifier import load_classifier
from raydae.eval.features import RandomFeatureNet
from raydae.eval.inception import InceptionFeatures
from raydae.eval.selfsup import load_degradation_estimator

RANDFEAT, INCEPTION = "randfeat", "inception"
SHAPES_CLASSIFIER, DATA_CLASSIFIER, SELFSUP = "shapesclf", "dataclf", "selfsup"
# The metric that heads tables and sweeps: the best-founded feature space present. At most one trained
# space exists per data set; the random net comes last, a weak fallback.
HEADLINE_ORDER = ((INCEPTION, "fid"), (SHAPES_CLASSIFIER, "fd_shapesclf"), (DATA_CLASSIFIER, "fd_dataclf"),
                  (SELFSUP, "fd_selfsup"), (RANDFEAT, "fd_randfeat"))


def metric_name(kind: str, space: str) -> str:
    """`fd`/`kd`/`precision`/`recall` in `space` -> its key: Inception's are FID/KID, the others say their features."""
    if space == INCEPTION and kind in ("fd", "kd"):
        return {"fd": "fid", "kd": "kid"}[kind]
    return f"{kind}_{space}"


def trained_space(source: str, num_classes: int, steps: int) -> str | None:
    """The feature network raydae trains for a data set: a classifier where there are classes to learn
    (`shapesclf` on builtin:shapes, `dataclf` on other data with >= 2 classes), else the self-supervised
    net (`selfsup`); None when `eval.classifier_steps` is 0."""
    if steps <= 0:
        return None
    if source.strip() == "builtin:shapes":
        return SHAPES_CLASSIFIER
    return DATA_CLASSIFIER if num_classes >= 2 else SELFSUP


def headline_space(spaces: list[str]) -> str:
    """The space whose metric heads tables and sweeps: the first of HEADLINE_ORDER that is present."""
    return next(space for space, _ in HEADLINE_ORDER if space in spaces)


def headline_metric(spaces: list[str]) -> str:
    """The metric that heads tables and sweeps (`fid`, `fd_shapesclf`, ...)."""
    return dict(HEADLINE_ORDER)[headline_space(spaces)]


# ------------------------------------------------------------------------------- feature networks

@dataclass
class FeatureSpec:
    """What every task needs to build the same feature networks (small and picklable)."""

    randfeat_seed: int
    randfeat_dim: int
    classifier: bytes | None  # a saved classifier (raydae.eval.classifier), scoring in `classifier_space`
    inception_path: str | None  # a verified weights file; must be readable on every node
    classifier_space: str = SHAPES_CLASSIFIER  # shapesclf on builtin:shapes, dataclf on other labelled data
    selfsup: bytes | None = None  # a saved degradation estimator (raydae.eval.selfsup) for unlabelled data

    @property
    def spaces(self) -> list[str]:
        present = ((INCEPTION, self.inception_path), (self.classifier_space, self.classifier),
                   (SELFSUP, self.selfsup), (RANDFEAT, True))
        return [space for space, on in present if on]

    def identity(self) -> str:
        """Changes whenever a feature network changes: keys the real-feature cache."""
        digest = hashlib.sha256(f"{self.randfeat_seed}:{self.randfeat_dim}:{self.inception_path}".encode())
        digest.update(self.classifier or b"")
        # Only new spaces add to the digest, so the caches of builtin:shapes runs stay valid.
        if self.classifier_space != SHAPES_CLASSIFIER:
            digest.update(self.classifier_space.encode())
        if self.selfsup is not None:
            digest.update(SELFSUP.encode() + self.selfsup)
        return digest.hexdigest()[:12]


class Embedder:
    """Images in [-1, 1] -> features in every space of the spec (+ Inception logits, classifier predictions)."""

    def __init__(self, spec: FeatureSpec, device: torch.device):
        self.device = device
        self.randfeat = RandomFeatureNet(spec.randfeat_seed, spec.randfeat_dim).to(device)
        self.classifier_space = spec.classifier_space
        self.classifier = None
        if spec.classifier is not None:
            self.classifier, _ = load_classifier(io.BytesIO(spec.classifier))
            self.classifier.to(device).eval()
        self.selfsup = None
        if spec.selfsup is not None:
            self.selfsup, _ = load_degradation_estimator(io.BytesIO(spec.selfsup))
            self.selfsup.to(device).eval()
        self.inception = None
        if spec.inception_path:
            self.inception = InceptionFeatures(spec.inception_path).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        images = images.to(self.device, torch.float32).clamp(-1, 1)
        out = {RANDFEAT: self.randfeat(images)}
        if self.classifier is not None:
            out[self.classifier_space] = self.classifier.features(images)
            out[f"{self.classifier_space}_class"] = self.classifier(images).argmax(dim=1)
        if self.selfsup is not None:
            out[SELFSUP] = self.selfsup.features(images)
        if self.inception is not None:
            out[INCEPTION], out["inception_logits"] = self.inception(images)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}


class FeatureBank:
    """Per-batch embeddings gathered into one array per key."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, embedded: dict[str, np.ndarray]) -> None:
        for key, value in embedded.items():
            self.parts.setdefault(key, []).append(value)

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) for key, parts in self.parts.items()}
