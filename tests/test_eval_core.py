"""Evaluation numerics on hand-made features and tiny networks: distances, random features, complexity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raydae.eval import (
    RandomFeatureNet,
    conv_spectral_norm,
    empirical_lipschitz,
    feature_statistics,
    flops_per_image,
    frechet_distance,
    frechet_from_statistics,
    kernel_distance,
    lipschitz_upper_bound,
    precision_recall,
)
from raydae.eval.distances import unbiased_mmd2
from raydae.scoring import sample_chunks


def _gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


def test_frechet_is_zero_on_identical_sets_and_mean_shift_squared_on_a_pure_shift():
    feats = _gaussian(500, 16, 0)
    scale = np.trace(np.cov(feats, rowvar=False))
    assert abs(frechet_distance(feats, feats)) < 1e-6 * scale
    shift = np.linspace(-1.0, 1.0, 16)
    shifted = frechet_distance(feats, feats + shift)
    assert shifted == pytest.approx(float(shift @ shift), rel=1e-6)
    assert shifted > 1.0
    mu, sigma = feature_statistics(torch.from_numpy(feats).float())
    assert mu.dtype == np.float64 and sigma.shape == (16, 16)


def test_frechet_closed_form_for_diagonal_gaussians():
    # Diagonal covariances: FD = ||Δμ||² + Σ (√a − √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_from_statistics(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_kernel_distance_is_near_zero_for_one_distribution_and_large_for_a_shift():
    real, other = _gaussian(400, 8, 1), _gaussian(400, 8, 2)
    same_mean, same_std = kernel_distance(real, other, subsets=5, subset_size=200)
    shifted_mean, _ = kernel_distance(real, other + 1.0, subsets=5, subset_size=200)
    assert shifted_mean > 0.1
    assert abs(same_mean) < 0.05 * shifted_mean
    assert 0 < same_std < 0.05 * shifted_mean  # the subsets differ, by far less than a shifted set does
    # Subset size is clipped to half the smaller set; the answer depends only on the seed.
    assert kernel_distance(real[:50], other, subset_size=25, seed=3) == kernel_distance(real[:50], other, seed=3)
    assert kernel_distance(real[:50], other, subset_size=24, seed=3) != kernel_distance(real[:50], other, seed=3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_distance(real[:1], other)
    # With the sets as large as the default subset, the subsets still differ: the std is not ~0.
    assert kernel_distance(real, other, subset_size=400)[1] > 1e-3 * abs(shifted_mean)


def test_kernel_distance_is_the_unbiased_mmd_estimate_by_hand():
    """Each subset's estimate: the diagonal k(x, x) is left out within a set."""
    x, y = _gaussian(4, 3, 5), _gaussian(4, 3, 6) + 0.5
    k = lambda p, q: (p @ q.T / 3 + 1.0) ** 3  # noqa: E731 - the cubic kernel, by hand
    off = 1 - np.eye(4)
    expected = (k(x, x) * off).sum() / 12 + (k(y, y) * off).sum() / 12 - 2 * k(x, y).mean()
    biased = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    assert abs(expected - biased) > 0.1 * abs(expected)  # the check can tell the two apart
    assert unbiased_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-12)


def test_precision_recall_identical_sets_and_partial_mode_coverage():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    real = np.concatenate([c + rng.normal(size=(100, 2)) for c in centres])
    precision, recall = precision_recall(real, real, k=3)
    assert precision == pytest.approx(1.0) and recall == pytest.approx(1.0)
    fake = centres[0] + rng.normal(size=(400, 2))  # only one of the four modes
    precision, recall = precision_recall(real, fake, k=3, chunk_size=64)
    assert precision > 0.8
    assert recall < 0.4


def test_random_feature_net_is_seeded_and_checks_range():
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.manual_seed(123)
    first = RandomFeatureNet(seed=0, feature_dim=64).features(images, batch_size=2)
    torch.manual_seed(456)
    again = RandomFeatureNet(seed=0, feature_dim=64).features(images, batch_size=5)
    other = RandomFeatureNet(seed=1, feature_dim=64).features(images)
    assert first.shape == (5, 64)
    assert torch.allclose(first, again, atol=1e-6)
    assert not torch.allclose(first, other)
    assert "NOT FID" in RandomFeatureNet.__doc__ and "fd_randfeat" in RandomFeatureNet.__doc__
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        RandomFeatureNet(feature_dim=64).features(images * 3)


def test_flops_of_a_conv_match_the_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    flops = flops_per_image(conv, torch.zeros(4, 3, 16, 16))
    assert flops == 2 * 3 * 8 * 3 * 3 * 16 * 16


def test_lipschitz_bound_is_exact_for_one_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    largest_singular_value = torch.linalg.svdvals(layer.weight.detach().double())[0].item()
    assert lipschitz_upper_bound(layer) == pytest.approx(largest_singular_value, rel=1e-9)


def test_lipschitz_bound_dominates_the_empirical_estimate_for_an_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    bound = lipschitz_upper_bound(mlp)
    estimate = empirical_lipschitz(mlp, torch.randn(16, 8), eps=1e-3, trials=8)
    assert 0.0 < estimate <= bound
    w1, w2 = (torch.linalg.matrix_norm(m.weight.double(), ord=2).item() for m in (mlp[0], mlp[2]))
    assert bound == pytest.approx(w1 * w2, rel=1e-9)


def test_conv_spectral_norm_matches_the_dense_operator_and_groupnorm_gives_none():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    shape = (2, 6, 6)
    # Dense matrix of the (bias-free) conv on 2×6×6 inputs, column by column.
    basis = torch.eye(2 * 6 * 6, dtype=torch.float64).view(-1, *shape)
    dense = nn.functional.conv2d(basis, conv.weight.double(), None, 2, 1).flatten(1).T
    exact = torch.linalg.matrix_norm(dense, ord=2).item()
    assert conv_spectral_norm(conv, shape) == pytest.approx(exact, rel=1e-4)
    net = nn.Sequential(conv, nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(27, 1))
    assert lipschitz_upper_bound(net, input_shape=shape) >= empirical_lipschitz(net, torch.randn(4, *shape))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(net)
    with pytest.warns(UserWarning, match="GroupNorm"):
        assert lipschitz_upper_bound(nn.Sequential(conv, nn.GroupNorm(1, 3)), input_shape=shape) is None


# ---------------------------------------------------------------- feature-space glue and Inception checks


def test_spectral_norm_product_equals_the_bound_on_a_plain_network_and_flags_groupnorm():
    from raydae.eval.complexity import spectral_norm_product

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    assert spectral_norm_product(mlp, (6,)) == pytest.approx(lipschitz_upper_bound(mlp), rel=1e-9)
    normed = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 3, padding=1))
    with pytest.warns(UserWarning, match="GroupNorm"):
        assert lipschitz_upper_bound(normed, (2, 8, 8)) is None
    assert spectral_norm_product(normed, (2, 8, 8)) > 0  # still a comparable proxy


def test_our_frechet_distance_agrees_with_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = RandomFeatureNet(seed=0, feature_dim=32)

    class Features(nn.Module):
        num_features = 32

        def forward(self, x):
            return net(x)

    metric = FrechetInceptionDistance(feature=Features(), input_img_size=(3, 16, 16))
    generator = torch.Generator().manual_seed(0)
    real = torch.rand((200, 3, 16, 16), generator=generator) * 2 - 1
    fake = (torch.rand((200, 3, 16, 16), generator=generator) * 2 - 1) * 0.5
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert frechet_distance(net(real), net(fake)) == pytest.approx(float(metric.compute()), rel=1e-3)


def test_a_missing_or_wrong_hash_inception_file_is_a_clear_error(tmp_path, monkeypatch):
    from raydae.errors import UserError
    from raydae.eval.inception import resolve_inception_weights

    with pytest.raises(UserError, match="no such file"):
        resolve_inception_weights(str(tmp_path / "nope.pth"))
    impostor = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    impostor.write_bytes(b"not the inception weights")
    with pytest.raises(UserError, match="SHA-256 .* does not match"):
        resolve_inception_weights(str(impostor))
    # A pinned full hash of the file itself is accepted; an empty setting looks in torch hub's cache only.
    import hashlib

    assert resolve_inception_weights(str(impostor), hashlib.sha256(impostor.read_bytes()).hexdigest()) == str(impostor)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert resolve_inception_weights("") is None


def test_inception_score_is_one_for_identical_predictions_and_k_for_k_confident_classes():
    from raydae.eval.inception import inception_score

    same = torch.zeros(100, 10)
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0)
    confident = torch.full((96, 10), -30.0)  # 4 folds of 24: each holds 6 of every class
    confident[torch.arange(96), torch.arange(96) % 4] = 30.0
    assert inception_score(confident, splits=4)[0] == pytest.approx(4.0, rel=1e-6)


def test_metric_names_say_which_features_made_them():
    from raydae.eval.spaces import metric_name

    assert metric_name("fd", "inception") == "fid" and metric_name("kd", "inception") == "kid"
    assert metric_name("fd", "randfeat") == "fd_randfeat" and metric_name("fd", "shapesclf") == "fd_shapesclf"
    assert metric_name("precision", "inception") == "precision_inception"


def test_sampling_tasks_draw_the_same_batches_however_many_there_are():
    """Each batch's noise is seeded by its first index: chunks must start on batch boundaries and cover all."""
    for tasks in (1, 2, 3, 7):
        chunks = sample_chunks(1000, tasks, 64)
        assert sum(count for _, count in chunks) == 1000 and chunks[0][0] == 0
        assert all(start % 64 == 0 for start, _ in chunks) and len(chunks) <= tasks
        assert all(a + n == b for (a, n), (b, _) in zip(chunks, chunks[1:]))
    assert sample_chunks(1000, 2, 250) == [(0, 500), (500, 500)]
