"""Encode a dataset once with a frozen encoder and keep the latents as Parquet, keyed by a hash.

Generators train from these shards (`get_dataset_shard(...).iter_torch_batches(...)`) instead of
re-encoding images every epoch. The key hashes the encoder's and bottleneck's weights together with
the data settings that decide which images were encoded, so a later run with the same encoder on the
same data finds and reuses them under `<storage>/latents/<key>/` (manifest.json there names the shards'
folder; for an image folder the key also covers the files' paths, sizes and modification times).

Columns:
    KL bottleneck: `mean`, `logvar` (float32, flattened C*h*w) and `label`
    VQ bottleneck: `codes` (int64, flattened h*w raster order) and `label`
`manifest.json` records the latent shape, counts and, for KL, the standard deviation of sampled
latents on the training split (DiT scales latents by it rather than by a hard-coded constant).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset
import ray.data
import torch

from raydae.checkpoints import load_checkpoint_state, load_task
from raydae.config import Config
from raydae.data.images import source_fingerprint
from raydae.devices import pick_device
from raydae.eval.latent_quality import latent_quality
from raydae.models import build_bottleneck, build_encoder
from raydae.pixels import model_input
from raydae.progress import Progress, heartbeat
from raydae.storage import RunFolder, filesystem
from raydae.tasks import encode_images, latent_signature

MANIFEST = "manifest.json"
FORMAT = "raydae-latents-v1"
ENCODE_BATCH = 256  # images per encoder call in the Ray Data actors
# A cached split up to this size is read by the driver with pyarrow, a Parquet file a block: a read_parquet
# execution's start-up (6-11 s here for 256 latents) costs more than the read. A larger one stays a distributed
# read, so that no driver (nor a Ray Client on a laptop) downloads the set and uploads it again.
DRIVER_READ_BYTES = 64 * 2**20


def encoder_key(state: dict, config: Config) -> str:
    """Hash of the frozen encoder (+ bottleneck) weights and of the data that was encoded."""
    digest = hashlib.sha256()
    for module in ("encoder", "bottleneck"):
        for name, tensor in sorted(state["models"][module].items()):
            digest.update(f"{module}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if config.ae.sign_scramble:  # the same weights give other latents; keys of unscrambled runs stay as they were
        digest.update(b"sign_scramble")
    digest.update(data_fingerprint(config.data).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data) -> str:
    """Which images a `DataConfig` yields, in which order: its settings and what is in a folder source now.

    Shared by every cache keyed on the data (latents here, evaluation's real-image features)."""
    settings = dict(data.__dict__)
    for ignored in ("on_bad_file", "shuffle_buffer"):  # neither changes which images come, nor their split
        settings.pop(ignored, None)
    if not data.shuffle_buffer:  # the training split's blocks keep their order: evaluation's first N images differ
        settings["train_blocks_in_order"] = True  # (named only when off, so the usual keys stay as they were)
    return json.dumps([settings, source_fingerprint(data.source)], sort_keys=True, default=str)


class EncodeBatch:
    """Ray Data actor: builds the frozen encoder once, then encodes batches of images."""

    def __init__(self, checkpoint_uri: str, use_gpu: bool = False):
        state = load_checkpoint_state(checkpoint_uri)
        config = Config.from_dict(state["config"])
        self.bottleneck_kind = config.ae.bottleneck
        self.device = pick_device(use_gpu)
        self.encoder = build_encoder(config.ae)
        self.bottleneck = build_bottleneck(config.ae)
        self.encoder.load_state_dict(state["models"]["encoder"])
        self.bottleneck.load_state_dict(state["models"]["bottleneck"])
        for module in (self.encoder, self.bottleneck):
            module.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        # A copy: Ray Data hands read-only arrays, which torch warns about on every batch.
        images = model_input(torch.tensor(np.asarray(batch["image"]), device=self.device))
        encoded = encode_images(self.encoder, self.bottleneck, images)
        out = {"label": np.asarray(batch["label"], dtype=np.int64)}
        if self.bottleneck_kind == "vq":
            out["codes"] = encoded.indices.flatten(1).cpu().numpy().astype(np.int64)
        else:
            mean, logvar = encoded.posterior
            out["mean"] = mean.flatten(1).float().cpu().numpy()
            out["logvar"] = logvar.flatten(1).float().cpu().numpy()
        return out


@dataclass
class LatentSet:
    uri: str  # folder holding the train/ and val/ shards (the manifest sits one level up)
    manifest: dict
    reused: bool


def latent_folder(storage: str, key: str) -> RunFolder:
    return RunFolder(storage, f"latents/{key}")


def encode_dataset(config: Config, checkpoint_uri: str, state: dict, bundle, storage: str) -> LatentSet:
    """Encode `bundle.train` and `bundle.val` unless latents for this key are already stored."""
    key = encoder_key(state, config)
    folder = latent_folder(storage, key)
    if folder.exists(MANIFEST):
        manifest = folder.read_json(MANIFEST)
        if latents_stored(manifest["shards"]):
            return LatentSet(manifest["shards"], manifest, reused=True)
        print(f"[latents] the stored latents {manifest['shards']} are gone; encoding them again", flush=True)
    scaling = config.scaling
    started = time.time()
    counts = {}
    # Each attempt writes into its own sub-folder and the manifest, written last, names it: two runs
    # encoding the same key at once cannot mix or delete each other's shards.
    attempt = uuid.uuid4().hex[:12]
    for split, dataset in (("train", bundle.train), ("val", bundle.val)):
        counts[split] = bundle.num_train if split == "train" else bundle.num_val
        actors = max(1, min(scaling.num_workers, math.ceil(counts[split] / ENCODE_BATCH)))  # no idle actor
        # max_restarts has no named parameter in Ray Data 2.60 and goes through ray_remote_args, which warns
        # that it is deprecated (removed in 2.64; constraints.txt pins 2.60): the warning is Ray's, not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            encoded = dataset.map_batches(
                EncodeBatch,
                fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "use_gpu": scaling.use_gpu},
                batch_size=ENCODE_BATCH,
                compute=ray.data.ActorPoolStrategy(size=actors),
                # Ray Data restarts a dead actor by default, but these actors' constructor arguments live in the
                # object store, where Ray cannot promise them for a restart (it logs an error for every encoding).
                # An encoding that fails is redone whole by the next run: the manifest is written last.
                max_restarts=0,
                num_gpus=scaling.gpus_per_worker if scaling.use_gpu else 0,
                num_cpus=1,
            )
        target = folder.child(attempt, split)
        heartbeat("latents", f"encoding the {split} split ({counts[split]} images)",
                  lambda: encoded.write_parquet(target), status=_shards_written(folder, target))
    signature = latent_signature(config)
    manifest = {
        "format": FORMAT,
        "key": key,
        "shards": folder.child(attempt),
        "encoder_checkpoint": checkpoint_uri,
        **signature,
        "counts": counts,
        "label_names": list(bundle.label_names),
        "seconds": time.time() - started,
    }
    if signature["bottleneck"] == "kl":
        manifest["latent_std"] = measure_latent_std(folder.child(attempt, "train"), seed=config.train.seed,
                                                    expected_rows=counts["train"])
    folder.write_json(MANIFEST, manifest)  # written last: its presence means the set is complete
    return LatentSet(manifest["shards"], manifest, reused=False)


def latents_stored(uri: str) -> bool:
    """Whether both splits of a latent set are still in storage (a user may have deleted them to free space)."""
    return all(RunFolder.from_path(uri).exists(split) for split in ("train", "val"))


def _shards_written(folder: RunFolder, target: str):
    """For a heartbeat: how many Parquet files the encoding wrote so far (local storage; remote: nothing)."""
    def status() -> str:
        if not folder.is_local or not os.path.isdir(target):
            return ""
        return f"{sum(name.endswith('.parquet') for name in os.listdir(target))} Parquet file(s) written"
    return status


def measure_latent_std(train_uri: str, seed: int, max_rows: int = 20000, expected_rows: int | None = None) -> float:
    """Standard deviation of latents sampled from the posteriors (what the generator sees)."""
    generator = np.random.default_rng(seed)
    total, total_sq, count = 0.0, 0.0, 0
    progress = Progress("latents", "std of sampled latents", total=min(max_rows, expected_rows or max_rows),
                        unit="latents", every_fraction=1.0)  # a second or two: lines only if it is slow
    for batch in latent_batches(train_uri, ("mean", "logvar"), max_rows):
        progress.advance(len(batch["mean"]))
        mean, logvar = batch["mean"].astype(np.float64), batch["logvar"].astype(np.float64)
        z = mean + np.exp(0.5 * logvar) * generator.standard_normal(mean.shape)
        total += z.sum()
        total_sq += (z ** 2).sum()
        count += z.size
    variance = total_sq / count - (total / count) ** 2
    std = float(np.sqrt(max(variance, 1e-12)))
    progress.finish(f"std {std:.4f}")
    return std


def latent_batches(split_uri: str, columns: tuple[str, ...] | None = None, max_rows: int | None = None,
                   batch_size: int = 4096):
    """The first `max_rows` rows (None: all) of a stored split's `columns` (None: all), in batches of numpy
    arrays, read with pyarrow alone: a Ray Data execution's start-up (4-10 s here) is longer than reading a
    few thousand latents."""
    parquet = _parquet_split(split_uri)
    columns = tuple(columns or parquet.schema.names)
    scanner = parquet.scanner(columns=list(columns), batch_size=batch_size)
    left = float("inf") if max_rows is None else max_rows
    for record_batch in scanner.to_batches():
        if left <= 0:
            break
        rows = record_batch if left >= record_batch.num_rows else record_batch.slice(0, int(left))
        left -= rows.num_rows
        if rows.num_rows:
            # Tensor columns are Ray's Arrow extension type (registered by importing ray.data): one array per row.
            yield {name: np.stack(rows.column(name).to_numpy(zero_copy_only=False)) for name in columns}


def read_latents(uri: str, split: str, cache: bool = False):
    """A stored split as a Ray Dataset: streamed from storage, or (`cache`) read once into the object store
    and reused every epoch."""
    path = f"{uri.rstrip('/')}/{split}"
    if not cache:
        return ray.data.read_parquet(path)
    parquet = _parquet_split(path)
    fragments = sorted(parquet.get_fragments(), key=lambda fragment: fragment.path)  # read_parquet's order
    stored = sum(info.size for info in parquet.filesystem.get_file_info([f.path for f in fragments]))
    if stored > DRIVER_READ_BYTES:
        return ray.data.read_parquet(path).materialize()
    return ray.data.from_arrow_refs([ray.put(fragment.to_table()) for fragment in fragments])


def _parquet_split(split_uri: str) -> pyarrow.dataset.Dataset:
    """A stored split's Parquet files, opened with pyarrow on whatever storage holds them."""
    fs, path = filesystem(split_uri.rstrip("/"))
    return pyarrow.dataset.dataset(path, filesystem=fs, format="parquet")


def measure_latent_space(autoencoder_uri: str, image_set: dict, limit: int, *, use_gpu: bool,
                         probe_steps: int = 0) -> dict[str, float]:
    """Cheap measures of the final latent space (raydae.eval.latent_quality) on held-out images, before any
    generator trains: spectral high-frequency share, channel scale and tails, encoder/decoder equivariance,
    and (probe_steps > 0) a small probe generator's held-out loss."""
    device = pick_device(use_gpu)
    task = load_task(autoencoder_uri, ("stage2", "joint"), device=str(device))
    count = min(limit, len(image_set["image"]))
    images = model_input(torch.tensor(image_set["image"][:count], device=device))

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encode_images(task.encoder, task.bottleneck, x).z

    with torch.no_grad():
        z = torch.cat([encode(chunk) for chunk in images.split(256)])
    return latent_quality(z, encoder=encode, decoder=task.decoder, images=images, probe_steps=probe_steps)
