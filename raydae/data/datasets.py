"""Ray Datasets for training: rows of `image` (uint8 3 x S x S) and `label` (int64).

Three sources, chosen by data.source:
  builtin:shapes   rendered once with map_batches and materialised;
  an image folder  a preflight pass decodes every file (Ray's read_images aborts the whole read on one
                   bad file and may not say which), then the good files are read and decoded;
  a Parquet folder written by `raydae data pack` (recognised by its manifest.json).
A folder or Parquet set whose decoded images fit IN_MEMORY_SHARE of Ray's object store is decoded once
and kept there (as builtin:shapes is): re-reading and decoding it every epoch restarts Ray Data's read
tasks, ~2 s before the first batch, which on a set of ~25 steps an epoch is ~10% of the step time.
Larger sets stream, read and decoded per epoch; their epochs are long enough to hide that restart.
Even from memory each pass over a data set starts Ray Data's execution again (~0.2 s), so a trainer iterates
`training_dataset(bundle)`: a small in-memory split repeated to at least ROWS_PER_PASS rows a pass.
A Train worker reads them with `get_dataset_shard(...).iter_torch_batches(dtypes=...)` and the task turns
the uint8 images into model input on its device (`pixels.model_input`).

`import ray` happens inside the functions so `raydae data pack` does not pay for it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from raydae.config import DataConfig
from raydae.data import images as imgs
from raydae.data.pack import MANIFEST_NAME, read_manifest, read_paths
from raydae.data.shapes import SHAPE_NAMES, render_shapes
from raydae.errors import UserError
from raydae.progress import Progress, heartbeat

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("builtin:shapes",)
BAD_FILES_NAME = "bad_files.txt"
SOURCE_HINT = "give an image folder, a packed Parquet folder or builtin:shapes"
# Decoded train + val images (uint8) up to this share of Ray's object store are kept in memory; the rest
# of the store stays free for the training's own objects (latents, evaluation arrays, checkpoints).
IN_MEMORY_SHARE = 0.25
# A pass over the training data restarts Ray Data's execution; at least this many rows a pass (builtin:shapes'
# default train_size: data wait 0.3-0.8% of stage 1's step time) keep that restart out of the step time.
ROWS_PER_PASS = 20000


@dataclass
class DataBundle:
    train: "ray.data.Dataset"
    val: "ray.data.Dataset"
    num_train: int
    num_val: int
    label_names: list[str]
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad files skipped
    in_memory: bool = False  # decoded once and held in Ray's object store (else read and decoded per epoch)


def build_datasets(data_cfg: DataConfig, report_dir: str | None = None) -> DataBundle:
    """The train and val datasets for data_cfg.source; bad files skipped are listed in report_dir."""
    source = data_cfg.source.strip()
    root = check_source(data_cfg)
    if root is None:
        bundle = _shapes(data_cfg)
    else:
        if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
            bundle = _parquet(root, data_cfg)
        else:
            bundle = _folder(root, data_cfg)
        _keep_in_memory_if_small(bundle, data_cfg.image_size)
    if data_cfg.shuffle_buffer > 0:
        # Image folders list files class by class: without this a batch would hold one class only.
        bundle.train = bundle.train.randomize_block_order(seed=data_cfg.seed)
    _report_skipped(bundle.skipped_files, report_dir)
    log.info(
        "data %s: %d train / %d val images, %d labels%s", source, bundle.num_train, bundle.num_val,
        len(bundle.label_names), " (in memory)" if bundle.in_memory else "",
    )
    return bundle


def training_dataset(bundle: DataBundle) -> "ray.data.Dataset":
    """What a trainer iterates: the training split, repeated to ROWS_PER_PASS rows a pass when it is in memory.

    Each image comes equally often within a pass (once per copy); only the loop's pass count changes."""
    copies = max(1, math.ceil(ROWS_PER_PASS / max(1, bundle.num_train))) if bundle.in_memory else 1
    return bundle.train.union(*[bundle.train] * (copies - 1)) if copies > 1 else bundle.train


def decoded_bytes(num_images: int, image_size: int) -> int:
    """Memory of `num_images` decoded images as they travel (uint8, 3 x S x S)."""
    return num_images * 3 * image_size * image_size


def in_memory_budget() -> int:
    """Bytes of decoded images build_datasets keeps in memory: IN_MEMORY_SHARE of Ray's object store."""
    import ray

    return int(IN_MEMORY_SHARE * ray.cluster_resources().get("object_store_memory", 0))


def _keep_in_memory_if_small(bundle: DataBundle, image_size: int) -> None:
    """Decode a folder or Parquet set once into Ray's object store when it fits the budget."""
    size = decoded_bytes(bundle.num_train + bundle.num_val, image_size)
    budget = in_memory_budget()
    if size > budget:
        log.info("data: %.0f MB of decoded images exceed the in-memory budget (%.0f MB, %.0f%% of Ray's object "
                 "store); reading and decoding them every epoch", size / 1e6, budget / 1e6, 100 * IN_MEMORY_SHARE)
        return
    what = f"decoding {bundle.num_train + bundle.num_val} images into memory ({size / 1e6:.0f} MB)"
    bundle.train, bundle.val = heartbeat("data", what, lambda: (bundle.train.materialize(), bundle.val.materialize()))
    bundle.in_memory = True


def check_source(data_cfg: DataConfig) -> str | None:
    """Cheap checks that need no Ray (run before starting it): the folder for a path source, else None."""
    source = data_cfg.source.strip()
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise UserError(f"data.source={source}: unknown built-in data set; built-in: {', '.join(BUILTIN_SOURCES)}")
        return None
    root = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(root):
        raise UserError(f"data.source={source}: no such file or directory; {SOURCE_HINT}")
    if not os.path.isdir(root):
        raise UserError(f"data.source={source}: is a file, not a folder; {SOURCE_HINT}")
    return root


def bad_files_text(skipped: list[tuple[str, str]]) -> str:
    """bad_files.txt: one `path<TAB>reason` line per skipped file (reasons folded onto one line)."""
    return "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in skipped)


def _report_skipped(skipped: list[tuple[str, str]], report_dir: str | None) -> None:
    if not skipped:
        return
    if report_dir is None:  # the caller holds bundle.skipped_files and reports them itself
        shown = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.info("skipped %d unreadable files (%s%s)", len(skipped), shown, more)
        return
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, BAD_FILES_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(bad_files_text(skipped))
    log.warning("skipped %d unreadable files (listed in %s)", len(skipped), path)


# ------------------------------------------------------------------------------ builtin:shapes
def _shapes(cfg: DataConfig) -> DataBundle:
    for name in ("train_size", "val_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"config data.{name}: builtin:shapes needs at least 1 image, got {getattr(cfg, name)}")
    return DataBundle(
        train=_shapes_split(cfg, "train", cfg.train_size),
        val=_shapes_split(cfg, "val", cfg.val_size),
        num_train=cfg.train_size,
        num_val=cfg.val_size,
        label_names=list(SHAPE_NAMES),
        in_memory=True,
    )


def _shapes_split(cfg: DataConfig, split: str, count: int) -> "ray.data.Dataset":
    import ray

    # ~1000 images (about 0.1 s of rendering) per task; rendered once and kept in the object store as
    # uint8, so an epoch streams blocks straight to the workers with no task in between.
    rendered = ray.data.range(count, override_num_blocks=max(1, math.ceil(count / 1000))).map_batches(
        render_shapes_batch,
        batch_size=None,
        fn_kwargs={"seed": cfg.seed, "split": split, "image_size": cfg.image_size, "max_shapes": cfg.max_shapes},
    )
    return rendered.materialize()


def render_shapes_batch(batch, seed: int, split: str, image_size: int, max_shapes: int) -> dict:
    """Rows of the built-in shapes dataset for the ids in `batch["id"]`, as its Ray Dataset holds them."""
    images, labels = render_shapes(seed, split, batch["id"], image_size, max_shapes)
    return {"image": imgs.to_chw(images), "label": labels}


# ------------------------------------------------------------------------------- image folder
def _folder(root: str, cfg: DataConfig) -> DataBundle:
    listing = imgs.list_images(root)
    bad = sorted(find_bad_files(listing.absolute()))
    if bad and cfg.on_bad_file == "error":
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise UserError(f"bad image file {path}: {reason}{more}; remove or fix it, or set data.on_bad_file=skip")
    bad_paths = {path for path, _ in bad}
    good = [i for i, path in enumerate(listing.absolute()) if path not in bad_paths]
    if not good:
        raise UserError(
            f"data.source={root}: all {len(bad)} image files are unreadable (first: {bad[0][0]}: {bad[0][1]})"
        )
    train_idx, val_idx = imgs.split_indices([listing.paths[i] for i in good], cfg.val_fraction)
    _check_split(root, len(train_idx), len(val_idx), cfg.val_fraction)
    label_index = {name: i for i, name in enumerate(listing.label_names)}
    return DataBundle(
        train=_files_dataset(root, listing.absolute([good[i] for i in train_idx]), label_index, cfg.image_size),
        val=_files_dataset(root, listing.absolute([good[i] for i in val_idx]), label_index, cfg.image_size),
        num_train=len(train_idx),
        num_val=len(val_idx),
        label_names=listing.label_names,
        skipped_files=bad,
    )


def find_bad_files(paths: list[str], every_s: float = 10.0) -> list[tuple[str, str]]:
    """(path, reason) for every file among `paths` that does not decode, checked in parallel.

    Says how far it is (a line per `every_s` seconds): on a large folder this pass takes minutes."""
    import ray

    progress = Progress("data", "checking that every image file decodes", total=len(paths), unit="files",
                        every_s=every_s, every_fraction=2.0)  # time-based lines only
    blocks = max(1, math.ceil(len(paths) / FILES_PER_READ_TASK))
    ds = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=blocks).map_batches(_check_batch)
    bad = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        bad += [(str(path), str(error)) for path, error in zip(batch["path"], batch["error"]) if error]
        progress.advance(len(batch["path"]))
    progress.finish(f"{len(bad)} unreadable" if bad else "all readable")
    return bad


def _check_batch(batch) -> dict:
    # One row per file (error "" when it decodes), so the driver can count the files checked.
    errors = []
    for data in batch["bytes"]:
        try:
            imgs.open_rgb(data)
            errors.append("")
        except Exception as err:  # noqa: BLE001 - any failure makes the file unusable; say why
            errors.append(imgs.describe_error(err))
    return {"path": np.array([str(p) for p in batch["path"]], dtype=object), "error": np.array(errors, dtype=object)}


FILES_PER_READ_TASK = 256


def _files_dataset(root: str, paths: list[str], label_index: dict[str, int], size: int) -> "ray.data.Dataset":
    import ray

    # About FILES_PER_READ_TASK files per read-and-decode task: Ray Data's own choice for small files is a
    # few huge tasks, so an epoch's first batch waits for a whole task and decoding barely overlaps training.
    blocks = max(1, math.ceil(len(paths) / FILES_PER_READ_TASK))
    return ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=blocks).map_batches(
        _decode_files_batch, fn_kwargs={"root": root, "label_index": label_index, "size": size}
    )


def _decode_files_batch(batch, root: str, label_index: dict[str, int], size: int) -> dict:
    # The path column is dropped here: a string column breaks iter_torch_batches.
    images = imgs.decode_squares(batch["bytes"], batch["path"], size)
    labels = [imgs.label_of(os.path.relpath(p, root).replace(os.sep, "/"), label_index) for p in batch["path"]]
    return {"image": imgs.to_chw(images), "label": np.array(labels, dtype=np.int64)}


# ---------------------------------------------------------------------------- Parquet shards
def _parquet(root: str, cfg: DataConfig) -> DataBundle:
    import ray

    manifest = read_manifest(root)
    shards = [os.path.join(root, name) for name in manifest["shards"]]
    rel_paths = read_paths(shards)
    if not rel_paths:
        raise UserError(f"data.source={root}: the packed data set holds no images; pack a folder with images")
    train_idx, val_idx = imgs.split_indices(rel_paths, cfg.val_fraction)
    _check_split(root, len(train_idx), len(val_idx), cfg.val_fraction)
    packed_size = manifest.get("image_size")
    if packed_size is not None and packed_size < cfg.image_size:
        log.warning(
            "data %s was packed at %dx%d but data.image_size=%d: images are upscaled; pack again at that size",
            root, packed_size, packed_size, cfg.image_size,
        )
    if manifest["skipped"]:
        log.info("data %s: %d files were skipped when it was packed (see its manifest)", root, len(manifest["skipped"]))

    def split(want_val: bool) -> "ray.data.Dataset":
        return ray.data.read_parquet(shards).map_batches(
            _decode_parquet_batch,
            fn_kwargs={"size": cfg.image_size, "val_fraction": cfg.val_fraction, "want_val": want_val},
        )

    return DataBundle(
        train=split(False),
        val=split(True),
        num_train=len(train_idx),
        num_val=len(val_idx),
        label_names=list(manifest["label_names"]),
    )


def _decode_parquet_batch(batch, size: int, val_fraction: float, want_val: bool) -> dict:
    # `image` arrives as an object array of Python bytes; keep this split's rows, decode them.
    keep = [i for i, p in enumerate(batch["path"]) if imgs.is_val(str(p), val_fraction) == want_val]
    images = imgs.decode_squares(batch["image"][keep], batch["path"][keep], size)
    return {"image": imgs.to_chw(images), "label": np.asarray(batch["label"], dtype=np.int64)[keep]}


def _check_split(root: str, num_train: int, num_val: int, val_fraction: float) -> None:
    total = num_train + num_val
    if num_val == 0:
        raise UserError(
            f"data.source={root}: the validation split is empty ({total} images, data.val_fraction={val_fraction}); "
            f"raise data.val_fraction or add images"
        )
    if num_train == 0:
        raise UserError(
            f"data.source={root}: the training split is empty ({total} images, data.val_fraction={val_fraction}); "
            f"lower data.val_fraction or add images"
        )
