"""Latents are written once per encoder (and data), round-trip exactly, and are reused."""

import os
import shutil

import numpy as np
import pytest
import ray.data
import torch

from raydae.checkpoints import save_training_state
from raydae.config import load_config
from raydae.data import build_datasets
from raydae import latents
from raydae.latents import (DRIVER_READ_BYTES, EncodeBatch, data_fingerprint, encode_dataset, encoder_key,
                            latent_batches, latents_stored, measure_latent_std, read_latents)
from raydae.pixels import model_input
from raydae.tasks import AutoencoderTask


def _checkpoint(tmp_path, config):
    torch.manual_seed(0)
    task = AutoencoderTask(config, "stage2")
    task.prepare(torch.device("cpu"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_training_state(str(folder), task, config, "stage2", step=1, history=[])
    return str(folder), task


def _direct_encoding(task, images: torch.Tensor, bottleneck: str) -> np.ndarray:
    with torch.no_grad():
        h = task.encoder(images)
        if bottleneck == "vq":
            return task.bottleneck.encode_indices(h).flatten(1).numpy()
        return task.bottleneck.encode(h)[0].flatten(1).numpy()


@pytest.mark.parametrize("bottleneck", ["kl", "vq"])
def test_the_encoding_actor_writes_what_the_encoder_gives(tmp_path, bottleneck):
    """Ray Data's map function on its own (the Ray round trip below runs the KL case; the VQ chain's e2e test
    trains its prior on stored codes)."""
    config = load_config("tiny", overrides=[f"ae.bottleneck={bottleneck}"])
    checkpoint, task = _checkpoint(tmp_path, config)
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 3, 16, 16), dtype=np.uint8)
    out = EncodeBatch(checkpoint)({"image": pixels, "label": np.arange(5)})
    direct = _direct_encoding(task, model_input(torch.tensor(pixels)), bottleneck)
    assert out["label"].dtype == np.int64 and list(out["label"]) == [0, 1, 2, 3, 4]
    if bottleneck == "vq":
        assert set(out) == {"label", "codes"} and out["codes"].dtype == np.int64
        np.testing.assert_array_equal(out["codes"], direct)
    else:
        assert set(out) == {"label", "mean", "logvar"} and out["mean"].dtype == np.float32
        assert out["logvar"].shape == out["mean"].shape == direct.shape
        np.testing.assert_allclose(out["mean"], direct, rtol=0, atol=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_latents_round_trip_and_are_reused(ray_session, tmp_path):
    bottleneck = "kl"
    config = load_config("tiny", overrides=["data.train_size=40", "data.val_size=12", "data.shuffle_buffer=0"])
    checkpoint, task = _checkpoint(tmp_path, config)
    state = torch.load(f"{checkpoint}/state.pt", weights_only=False)
    bundle = build_datasets(config.data)
    first = encode_dataset(config, checkpoint, state, bundle, str(tmp_path / "store"))
    assert not first.reused
    assert first.manifest["counts"] == {"train": 40, "val": 12}
    assert first.manifest["latent_shape"] == [2, 8, 8]

    # Compare the stored latents with a direct encoding of the same images (matched by label order
    # is not enough: rows may be reordered, so compare as sorted sets of rows).
    images = torch.cat([model_input(torch.tensor(b["image"])) for b in bundle.val.iter_batches(batch_format="numpy")])
    direct = _direct_encoding(task, images, bottleneck)
    stored = read_latents(first.uri, "val").to_pandas()
    column = "mean"
    values = np.stack(stored[column].to_numpy())
    assert values.shape == direct.shape and values.dtype == np.float32
    key = lambda a: np.lexsort(a.T[::-1])  # noqa: E731 - row order for comparison
    np.testing.assert_allclose(values[key(values)], direct[key(direct)], rtol=0, atol=1e-5)
    # The pyarrow reader (no Ray Data) gives the same rows in the same order, and max_rows cuts them.
    (read,) = latent_batches(f"{first.uri}/val", (column, "label"))
    np.testing.assert_array_equal(read[column], values)
    np.testing.assert_array_equal(read["label"], stored["label"].to_numpy())
    assert sum(len(b["label"]) for b in latent_batches(f"{first.uri}/train", ("label",), 25, batch_size=10)) == 25
    # The manifest's std is that of latents sampled from the stored posteriors (all 40 train rows).
    (train,) = latent_batches(f"{first.uri}/train", ("mean", "logvar"))
    z = train["mean"] + np.exp(0.5 * train["logvar"]) * np.random.default_rng(0).standard_normal(train["mean"].shape)
    assert first.manifest["latent_std"] == pytest.approx(measure_latent_std(f"{first.uri}/train", seed=0))
    assert first.manifest["latent_std"] == pytest.approx(z.std(), rel=1e-6)

    again = encode_dataset(config, checkpoint, state, bundle, str(tmp_path / "store"))
    assert again.reused and again.uri == first.uri
    shutil.rmtree(f"{first.uri}/train")  # a user freeing space: the set is encoded again, not "reused" half-gone
    redone = encode_dataset(config, checkpoint, state, bundle, str(tmp_path / "store"))
    assert not redone.reused and redone.uri != first.uri and latents_stored(redone.uri)
    assert not latents_stored(first.uri)


@pytest.mark.ray
@pytest.mark.parametrize("driver_read_bytes", [DRIVER_READ_BYTES, 0], ids=["read-by-driver", "read-by-ray-data"])
def test_a_cached_split_holds_the_stored_rows_in_order_with_their_types(ray_session, tmp_path, monkeypatch,
                                                                        driver_read_bytes):
    """Both ways a cached training split is read (pyarrow in the driver when small, read_parquet otherwise) hold
    every stored row once, with its own label, in read_parquet's schema, over several Parquet files (row order
    across files is not read_parquet's: its read tasks interleave the files)."""
    monkeypatch.setattr(latents, "DRIVER_READ_BYTES", driver_read_bytes)
    rng = np.random.default_rng(0)
    means, labels = rng.standard_normal((30, 2, 4, 4)).astype(np.float32), np.arange(30)
    ray.data.from_items([{"mean": mean, "label": label} for mean, label in zip(means, labels)]) \
        .repartition(3).write_parquet(str(tmp_path / "set" / "train"))
    assert len(os.listdir(tmp_path / "set" / "train")) == 3
    cached = read_latents(str(tmp_path / "set"), "train", cache=True)
    assert cached.schema() == read_latents(str(tmp_path / "set"), "train").schema()
    held = cached.take_all()
    assert sorted(row["label"] for row in held) == list(labels)
    for row in held:
        np.testing.assert_array_equal(row["mean"], means[row["label"]])


def test_key_changes_with_the_encoder_and_the_data():
    config = load_config("tiny")
    task = AutoencoderTask(config, "stage1")
    state = {"models": {n: m.state_dict() for n, m in task.models.items()}}
    base = encoder_key(state, config)
    assert encoder_key(state, config) == base
    assert encoder_key(state, load_config("tiny", overrides=["data.seed=1"])) != base
    # The shuffle buffer's size does not change which images come first; whether blocks are shuffled does.
    def fingerprint(*overrides):
        return data_fingerprint(load_config("tiny", overrides=list(overrides)).data)

    assert fingerprint("data.shuffle_buffer=7") == fingerprint() != fingerprint("data.shuffle_buffer=0")
    with torch.no_grad():
        next(task.encoder.parameters()).add_(1e-3)
    assert encoder_key({"models": {n: m.state_dict() for n, m in task.models.items()}}, config) != base


def test_latent_set_size_decides_caching():
    from raydae.pipeline import latent_set_gigabytes

    kl = {"latent_shape": [4, 8, 8], "bottleneck": "kl", "counts": {"train": 1000}}
    vq = {"latent_shape": [16, 8, 8], "bottleneck": "vq", "counts": {"train": 1000}}
    assert latent_set_gigabytes(kl) == pytest.approx(1000 * 2 * 4 * 4 * 64 / 1e9)  # mean + logvar, float32
    assert latent_set_gigabytes(vq) == pytest.approx(1000 * 8 * 64 / 1e9)  # one int64 code per position
