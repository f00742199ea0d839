"""Feature spaces that see: which trained space a data set gets, and that each grows with blur, noise and shuffling.

Tiny budgets (16×16 builtin:shapes images, a few hundred steps) so the whole file takes seconds; the
figures in comments are what these settings gave when the tests were written.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydae.config import Config
from raydae.data import images as imgs
from raydae.pixels import model_input
from raydae.data.shapes import render_shapes
from raydae.eval import RandomFeatureNet, frechet_distance
from raydae.eval.classifier import train_classifier
from raydae.eval.selfsup import (
    DegradationEstimator,
    load_degradation_estimator,
    save_degradation_estimator,
    train_degradation_estimator,
)
from raydae.eval.sensitivity import DEGRADATIONS, degrade, feature_sensitivity, shuffle_patches
from raydae.eval.spaces import HEADLINE_ORDER, Embedder, FeatureSpec, headline_metric, trained_space
from raydae.scoring import feature_spec
from raydae.scoring_tasks import measure_sensitivity
from raydae.storage import RunFolder

SIZE = 16


# --------------------------------------------------------------------------------- helpers
def _shapes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 16, 16) builtin:shapes images (one shape each: learnable in a few hundred steps), labels."""
    images, labels = render_shapes(seed, "train", range(n), image_size=SIZE, max_shapes=1)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _colour_blobs(n: int, seed: int = 0) -> torch.Tensor:
    """A bad generator: soft blobs of random colours on a random flat background, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    out = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, SIZE, SIZE).clone()
    for _ in range(3):
        centre = torch.rand(n, 2, generator=generator) * SIZE
        radius = 1.5 + torch.rand(n, generator=generator) * SIZE / 4
        colour = torch.rand(n, 3, generator=generator)
        distance2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
        mask = torch.exp(-distance2 / (2 * radius[:, None, None] ** 2))[:, None]
        out = out * (1 - mask) + colour[:, :, None, None] * mask
    return out * 2 - 1


def _pure_noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _check_sees_damage(embed, real: torch.Tensor) -> dict:
    """The space's distances rise with every level of every degradation, and bad generators sit far above."""
    report = feature_sensitivity(embed, real)
    floor = report["floor"]
    assert np.isfinite(floor) and floor > 0
    for kind, levels in DEGRADATIONS.items():
        assert report[kind]["levels"] == list(levels)
        assert report[kind]["monotone"], (kind, floor, report[kind]["fd"])
    assert report["monotone"] and report["num_images"] == len(real) // 2
    reference = embed(model_input(real[: len(real) // 2]))
    for bad in (_colour_blobs(len(real) // 2), _pure_noise(len(real) // 2)):
        assert frechet_distance(reference, embed(bad)) > 10 * floor
    return report


@pytest.fixture(scope="module")
def shapes_data():
    images, labels = _shapes(2000)
    return images, labels, images[:1000]  # the first 1000 are the "real" set of the sensitivity check


@pytest.fixture(scope="module")
def selfsup_net(shapes_data):
    images, _, _ = shapes_data
    return train_degradation_estimator(images, steps=200, width=8, warmup_steps=10, seed=0)


# ---------------------------------------------------------------------------- degradations
def test_degradations_keep_shape_and_range_and_shuffling_only_moves_tiles():
    real = model_input(_shapes(8)[0])
    generator = torch.Generator().manual_seed(0)
    for kind, levels in DEGRADATIONS.items():
        for level in levels:
            out = degrade(real, kind, level, generator)
            assert out.shape == real.shape and out.min() >= -1 and out.max() <= 1
    shuffled = shuffle_patches(real, 4, generator)
    tiles = lambda x: x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(8, 3, 16, 16).permute(0, 2, 1, 3)  # noqa: E731
    # The same 16 tiles of 4×4 pixels per image, in another order.
    assert torch.equal(tiles(shuffled).sort(dim=1).values, tiles(real).sort(dim=1).values)
    assert not torch.equal(shuffled, real)
    assert torch.equal(shuffle_patches(real, 1, generator), real)
    blurred = degrade(real, "blur", 2.0, generator)
    assert (blurred - real).abs().mean() > 0.01 and abs(float(blurred.mean() - real.mean())) < 0.02
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(real, "jpeg", 1, generator)


def test_sensitivity_report_format_and_the_floor_is_real_vs_real():
    real = _shapes(64)[0]
    net = RandomFeatureNet(seed=0, feature_dim=32)
    report = feature_sensitivity(lambda x: net.features(x).numpy(), real, batch_size=16)
    assert set(report) == {"num_images", "floor", "monotone", *DEGRADATIONS}
    halves = net.features(model_input(real[:32])), net.features(model_input(real[32:]))
    assert report["floor"] == pytest.approx(frechet_distance(*halves), rel=1e-6)
    assert len(report["noise"]["fd"]) == 3 and json.loads(json.dumps(report)) == report  # metrics.json-ready
    several = feature_sensitivity(lambda x: {"a": net.features(x).numpy(), "b": net.features(x).numpy()[:, :8]},
                                  real, batch_size=16)
    assert set(several) == {"a", "b"} and several["a"] == report  # one pass for several spaces, same numbers
    with pytest.raises(ValueError, match="at least 4 images"):
        feature_sensitivity(lambda x: net.features(x).numpy(), real[:3])


# --------------------------------------------------------------------------- trained spaces
def test_a_briefly_trained_classifier_sees_every_degradation_and_bad_generators(shapes_data):
    # Seeds 0-2: blur 2.8-11 / 14-39 / 30-63x the floor, noise 53-700 / 630-6100 / 3100-21000x, shuffle
    # 5-9 / 100-270 / 580-2800x; colour blobs 16-24x, pure noise > 10000x (train accuracy 0.40-0.54).
    images, labels, real = shapes_data
    model, _ = train_classifier(images, labels, num_classes=5, steps=300, warmup_steps=30, seed=0)
    _check_sees_damage(lambda x: model.features(x).numpy(), real)


def test_the_selfsup_net_sees_every_degradation_and_bad_generators(shapes_data, selfsup_net):
    # Seeds 0-2: blur 8-16 / 315-352 / 1380-1420x the floor, noise 39-64 / 283-411 / 1160-1730x, shuffle
    # 2.1-7.6 / 42-94 / 220-510x (shuffling never appears in its training). At 80 steps one seed in three
    # put the 2x2 shuffle below the floor. Colour blobs ~1000x, pure noise ~4700x (seed 0).
    _, _, real = shapes_data
    model, info = selfsup_net
    assert info["val_error"] is None and 0 < info["train_error"] < 0.25  # strengths in [0, 1]; guessing: ~0.3
    _check_sees_damage(lambda x: model.features(x).numpy(), real)


def test_the_random_net_is_the_weak_fallback(shapes_data, selfsup_net):
    # Random features put blur sigma 2 at 1.6-2.4x the floor where the selfsup net puts it at > 1000x.
    _, _, real = shapes_data
    model, _ = selfsup_net
    net = RandomFeatureNet(seed=0, feature_dim=64)
    weak = feature_sensitivity(lambda x: net.features(x).numpy(), real)
    strong = feature_sensitivity(lambda x: model.features(x).numpy(), real)
    for kind in DEGRADATIONS:
        assert strong[kind]["fd"][-1] / strong["floor"] > 10 * weak[kind]["fd"][-1] / weak["floor"]
    # Headline: a trained space wins over the random net; the random net only when nothing else is there.
    assert HEADLINE_ORDER[-1] == ("randfeat", "fd_randfeat")
    assert headline_metric(["randfeat"]) == "fd_randfeat"
    for space in ("shapesclf", "dataclf", "selfsup"):
        assert headline_metric([space, "randfeat"]) == f"fd_{space}"
    assert headline_metric(["inception", "selfsup", "randfeat"]) == "fid"


def test_selfsup_save_load_round_trip_and_determinism(shapes_data, selfsup_net):
    images, _, real = shapes_data
    model, info = selfsup_net
    buffer = io.BytesIO()
    save_degradation_estimator(model, buffer, info)
    buffer.seek(0)
    loaded, loaded_info = load_degradation_estimator(buffer)
    assert isinstance(loaded, DegradationEstimator) and not loaded.training and loaded_info == info
    torch.testing.assert_close(loaded.features(real[:50]), model.features(real[:50]), rtol=0, atol=0)
    again, _ = train_degradation_estimator(images[:200], steps=5, width=8, warmup_steps=2, seed=3)
    other, _ = train_degradation_estimator(images[:200], steps=5, width=8, warmup_steps=2, seed=3)
    torch.testing.assert_close(again.features(real[:20]), other.features(real[:20]), rtol=0, atol=0)
    assert model.estimate(real[:4]).shape == (4, 2)


# --------------------------------------------------------------------- which space a data set gets
def _write_folder(root, classes: list[str] | None, per_class: int = 12):
    """16×16 PNGs: reddish images in the first class, bluish in the second (top level when `classes` is None)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes or [None]):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([200, 60, 60]) if c == 0 else np.array([60, 60, 200])
            pixels = np.clip(base + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


def _folder_images(root) -> tuple[dict, list[str]]:
    """The folder decoded as evaluation gets it: {image: uint8 N×3×S×S, label}, and its label names."""
    listing = imgs.list_images(str(root))
    files = [Path(path).read_bytes() for path in listing.absolute()]
    squares = imgs.to_chw(imgs.decode_squares(files, listing.paths, SIZE))
    return {"image": squares, "label": np.asarray(listing.labels, dtype=np.int64)}, listing.label_names


def _in_process(calls: list):
    """`run_task` without Ray: the training function runs here (the test of which space is picked)."""
    def run_task(fn, *args):
        calls.append(fn.__name__)
        return fn(*args, use_gpu=False)
    return run_task


def _config(source: str, steps: int = 20, min_accuracy: float = 0.0) -> Config:
    config = Config()
    config.data.source, config.data.image_size = source, SIZE
    config.eval.classifier_steps, config.eval.min_classifier_accuracy = steps, min_accuracy
    return config


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception file in the cache


def test_trained_space_follows_the_labels():
    assert trained_space("builtin:shapes", 5, 1500) == "shapesclf"
    assert trained_space("/data/pets", 2, 1500) == "dataclf"
    assert trained_space("/data/faces", 1, 1500) == "selfsup"
    assert trained_space("builtin:shapes", 5, 0) is None and trained_space("/data/faces", 1, 0) is None


def test_a_folder_with_class_sub_folders_gets_dataclf_with_left_right_flips(tmp_path, no_inception):
    root = _write_folder(tmp_path / "pets", ["cat", "dog"])
    image_set, label_names = _folder_images(root)
    assert label_names == ["cat", "dog"]
    cache, calls = RunFolder(str(tmp_path), "eval_cache"), []
    config = _config(str(root))
    spec, described = feature_spec(config, cache, {"train": image_set, "val": image_set}, len(label_names),
                                   _in_process(calls))
    assert spec.spaces == ["dataclf", "randfeat"] and headline_metric(spec.spaces) == "fd_dataclf"
    assert calls == ["train_feature_classifier"] and "flips h" in described["dataclf"]
    assert "weak fallback" in described["randfeat"]
    info = json.loads(next((tmp_path / "eval_cache").glob("classifier-*.pt.json")).read_text())
    assert info["flips"] == "h" and info["val_accuracy"] > 0.9  # red vs blue
    embedded = Embedder(spec, torch.device("cpu"))(model_input(torch.from_numpy(image_set["image"][:5])))
    assert embedded["dataclf"].shape == (5, 128) and embedded["dataclf_class"].shape == (5,)
    # The second evaluation of the same data finds the classifier in the cache.
    again, _ = feature_spec(config, cache, {"train": image_set, "val": image_set}, 2, _in_process(calls))
    assert calls == ["train_feature_classifier"] and again.identity() == spec.identity()
    # Too weak a classifier is not used: the self-supervised net scores instead.
    weak, described = feature_spec(_config(str(root), min_accuracy=1.01), cache,
                                   {"train": image_set, "val": image_set}, 2, _in_process(calls))
    assert weak.spaces == ["selfsup", "randfeat"] and described["dataclf"].startswith("not used")


def test_a_folder_without_sub_folders_gets_selfsup_and_shapes_keep_shapesclf(tmp_path, no_inception):
    root = _write_folder(tmp_path / "faces", None)
    image_set, label_names = _folder_images(root)
    assert label_names == ["none"]
    calls = []
    spec, described = feature_spec(_config(str(root)), RunFolder(str(tmp_path), "eval_cache"),
                                   {"train": image_set, "val": image_set}, len(label_names), _in_process(calls))
    assert spec.spaces == ["selfsup", "randfeat"] and headline_metric(spec.spaces) == "fd_selfsup"
    assert calls == ["train_selfsup"] and "self-supervised" in described["selfsup"]
    assert Embedder(spec, torch.device("cpu"))(torch.zeros(2, 3, SIZE, SIZE))["selfsup"].shape == (2, 128)
    assert spec.identity() != FeatureSpec(0, 256, None, None).identity()
    # No trained network at all: the random net heads, as the weak fallback it is.
    bare, described = feature_spec(_config("builtin:shapes", steps=0), RunFolder(str(tmp_path), "eval_cache"),
                                   {}, 5, _in_process(calls))
    assert bare.spaces == ["randfeat"] and headline_metric(bare.spaces) == "fd_randfeat"
    assert "weak fallback" in described["randfeat"]


def test_shapes_caches_keep_their_keys():
    # The real-feature cache of builtin:shapes runs is keyed as before the new spaces came.
    spec = FeatureSpec(0, 256, b"classifier bytes", None)
    old = hashlib.sha256(b"0:256:None" + b"classifier bytes").hexdigest()[:12]
    assert spec.identity() == old and spec.spaces == ["shapesclf", "randfeat"]


def test_measure_sensitivity_reports_every_space_of_a_spec(shapes_data, selfsup_net):
    _, _, real = shapes_data
    model, info = selfsup_net
    buffer = io.BytesIO()
    save_degradation_estimator(model, buffer, info)
    spec = FeatureSpec(0, 64, None, None, selfsup=buffer.getvalue())
    out = measure_sensitivity({"image": real.numpy()}, 200, spec, 50, 0, use_gpu=False)
    assert set(out) == {"selfsup", "randfeat"} and out["selfsup"]["num_images"] == 100
    # The plumbing, not the verdict: 100 images and a seconds-long net make the middle levels noisy (the
    # monotone checks live in the tests above); the strongest level still stands far above the weakest.
    for kind in ("blur", "noise", "shuffle"):
        distances = out["selfsup"][kind]["fd"]
        assert len(distances) == 3 and distances[-1] > distances[0] and distances[-1] > 5 * out["selfsup"]["floor"] > 0
