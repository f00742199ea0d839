"""Ingest: images/second delivered by raydae's Ray Data pipeline against a torch DataLoader doing the same
decoding with as many worker processes, from (a) a folder of PNG files and (b) Parquet shards written by
`raydae data pack` (raydae.data.pack_folder); then the data-wait share of a short training stage.

    python bench/ingest.py [--images 4096] [--image-size 32] [--workers N] [--epochs 3]
                           [--stage-steps 150] [--stage-sources shapes,folder,parquet] [--device cpu|cuda]
                           [--out FILE]

The image folder is written here first: builtin:shapes images saved as PNGs in one sub-folder per class.
Ray Data arm: raydae.data.build_datasets(...).train (what a Train worker reads), iterated the way
train_worker does: iter_torch_batches(batch_size, drop_last, device, dtypes, prefetch_batches=4).
The file check build_datasets runs first for a folder (it decodes every file once) is timed apart, with the
one-off decode into memory of a set that fits raydae's in-memory budget (then each epoch reads memory).
DataLoader arm: a map-style Dataset (folder: one file per item) or an IterableDataset (Parquet: row
groups dealt out to the workers), decoding with raydae.data.images.load_square + to_chw (the same
PIL decode, resize/centre-crop, uint8 CHW tensors), default collate, num_workers = Ray's CPUs,
persistent workers, pin_memory on CUDA. Both arms turn batches into float32 [-1, 1] on the device
with pixels.model_input, as AutoencoderTask does. Both arms read the training split only and do not shuffle.
Epochs alternate between the arms; the first epoch of each is warm-up (worker processes, imports) and is
left out. Target: Ray Data / DataLoader >= 1.

Data wait: a short stage (stage 1 of --preset) through raydae.launch.fit_stage on each of
--stage-sources (shapes = the preset's own builtin:shapes, folder, parquet), reading the stage's
train/data_wait_fraction: the share of step time spent waiting for the next batch (target < 5%). It is a
share of step time, so a loaded machine inflates both alike; the epoch rates above are not.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402

from raydae.config import DataConfig, load_config  # noqa: E402
from raydae.data import images as imgs  # noqa: E402
from raydae.pixels import model_input  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="PNG files written (train + val)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the PNG files written")
    parser.add_argument("--size", type=int, default=None,
                        help="data.image_size the pipelines produce (default: --image-size; smaller resizes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Ray's CPUs = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="per arm and source; the first is warm-up")
    parser.add_argument("--shard-size", type=int, default=1000, help="pack: images per Parquet file (its default)")
    parser.add_argument("--preset", default="shapes", help="preset of the short training stage")
    parser.add_argument("--stage-steps", type=int, default=150, help="steps of the short stage; 0 skips it")
    parser.add_argument("--stage-sources", default="shapes,folder,parquet",
                        help="comma-separated: shapes (the preset's data), folder, parquet")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for the short stage")
    parser.add_argument("--workdir", default=None, help="where images and shards are written (default: temp)")
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/ingest-<time>.json)")
    args = parser.parse_args()
    benchlib.check_device(args.device)
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first is warm-up)")
    size = args.size or args.image_size
    sources = [s.strip() for s in args.stage_sources.split(",") if s.strip()]
    for s in sources:
        if s not in ("shapes", "folder", "parquet"):
            raise SystemExit(f"--stage-sources: unknown source {s!r}; give shapes, folder or parquet")
    info = benchlib.machine(args.device)
    benchlib.warn_other_load(info)
    print(f"machine: {benchlib.describe(info)}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="raydae-bench-ingest-")
    folder, packed = os.path.join(workdir, "images"), os.path.join(workdir, "packed")
    result: dict = {"machine": info, "settings": {
        "images": args.images, "image_size": args.image_size, "size": size, "workers": args.workers,
        "batch_size": args.batch_size, "epochs": args.epochs, "shard_size": args.shard_size,
        "device": args.device, "preset": args.preset, "stage_steps": args.stage_steps,
        "stage_sources": sources, "overrides": args.overrides}}
    import ray

    try:
        clock = benchlib.Stopwatch()
        write_pngs(folder, args.images, args.image_size)
        result["png_write_seconds"] = clock()
        clock = benchlib.Stopwatch()
        from raydae.data import pack_folder

        manifest = pack_folder(folder, packed, image_size=size, shard_size=args.shard_size)
        result["pack_seconds"] = clock()
        print(f"wrote {args.images} PNGs ({args.image_size}px) in {result['png_write_seconds']:.1f}s; packed into "
              f"{len(manifest['shards'])} Parquet shard(s) in {result['pack_seconds']:.1f}s; pipelines give "
              f"{size}px, batch {args.batch_size}, {args.workers} workers/CPUs", flush=True)

        benchlib.init_ray(args.workers, args.device)  # as many CPUs as the DataLoader has workers
        arms = {}
        for kind, root in (("folder", folder), ("parquet", packed)):
            arms[kind] = compare(kind, root, size, args)
        result["ingest"] = arms
        ray.shutdown()

        stages = {}
        if args.stage_steps > 0 and sources:
            # As raydae.launch.connect: one CPU beyond the Train worker's, for Ray Data's tasks.
            config0 = load_config(args.preset, overrides=args.overrides)
            need = math.ceil(config0.scaling.num_workers * config0.scaling.cpus_per_worker) + 1
            benchlib.init_ray(max(os.cpu_count() or 1, need), args.device)
            for source in sources:
                stages[source] = short_stage(args, {"shapes": None, "folder": folder, "parquet": packed}[source],
                                             size, workdir, source)
            ray.shutdown()
        result["stages"] = stages
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for kind, arm in result["ingest"].items():
        rows.append((f"{kind}: Ray Data img/s", arm["ray_images_per_second"],
                     " ".join(f"{v:.0f}" for v in arm["ray_epochs"])))
        rows.append((f"{kind}: DataLoader img/s", arm["loader_images_per_second"],
                     " ".join(f"{v:.0f}" for v in arm["loader_epochs"])))
        rows.append((f"{kind}: ratio Ray Data / DataLoader", arm["ratio"],
                     "target >= 1: " + ("MET" if arm["ratio"] >= 1 else "NOT MET")))
        rows.append((f"{kind}: first batch, s (Ray / DataLoader)", arm["ray_first_batch_seconds"],
                     f"{arm['loader_first_batch_seconds']:.3f}"))
        rows.append((f"{kind}: img/s after the 1st batch (Ray / DL)", arm["ray_images_per_second_after_first_batch"],
                     f"{arm['loader_images_per_second_after_first_batch']:.0f}"))
        rows.append((f"{kind}: build_datasets, s", arm["build_datasets_seconds"],
                     "once per run: " + ("file check + " if kind == "folder" else "")
                     + ("decode into memory" if arm["in_memory"] else "streamed, decoded every epoch")))
    for source, stage in result["stages"].items():
        rows.append((f"stage data wait, {source}", stage["data_wait_fraction"],
                     "target < 0.05: " + ("MET" if stage["data_wait_fraction"] < 0.05 else "NOT MET")))
        rows.append((f"stage img/s, {source}", stage["images_per_second"],
                     f"{stage['steps']} steps, {stage['train_images']} train images"
                     + (", in memory" if stage["in_memory"] else "")))
    print()
    print(f"Ingest: {args.images} PNGs at {args.image_size}px -> {size}px, batch {args.batch_size}, "
          f"{args.workers} workers, device {args.device}; img/s per measured epoch in the last column")
    print(benchlib.table(rows, ("figure", "value", "epochs / note")))
    path = benchlib.write_result(args.out, "ingest", result)
    print(f"wrote {path}")


# -------------------------------------------------------------------------------- the data
def write_pngs(folder: str, count: int, size: int) -> None:
    """builtin:shapes train images 0..count-1 as PNG files, one sub-folder per class (the label)."""
    from PIL import Image

    from raydae.data.shapes import SHAPE_NAMES, render_shapes

    for name in SHAPE_NAMES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for start in range(0, count, 1000):
        images, labels = render_shapes(0, "train", range(start, min(count, start + 1000)), size, 3)
        for offset, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(os.path.join(folder, SHAPE_NAMES[label], f"{start + offset:06d}.png"))


class FolderDataset(torch.utils.data.Dataset):
    """One PNG per item: read, decode, resize/crop, normalise (the project's functions)."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            square = imgs.load_square(f.read(), self.size)
        image = imgs.to_chw(square[None])[0]
        return torch.from_numpy(image), self.labels[i]


class ParquetDataset(torch.utils.data.IterableDataset):
    """Row groups of the packed shards dealt out to the workers; training rows only, decoded per row."""

    def __init__(self, shards: list[str], size: int, val_fraction: float):
        import pyarrow.parquet as pq

        self.groups = [(shard, g) for shard in shards for g in range(pq.ParquetFile(shard).num_row_groups)]
        self.size, self.val_fraction = size, val_fraction

    def __iter__(self):
        import pyarrow.parquet as pq

        worker = torch.utils.data.get_worker_info()
        rank, world = (worker.id, worker.num_workers) if worker else (0, 1)
        files = {}
        for shard, group in self.groups[rank::world]:
            if shard not in files:
                files[shard] = pq.ParquetFile(shard)
            table = files[shard].read_row_group(group, columns=["image", "label", "path"])
            for data, label, path in zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                         table.column("path").to_pylist()):
                if imgs.is_val(path, self.val_fraction):
                    continue
                image = imgs.to_chw(imgs.load_square(data, self.size)[None])[0]
                yield torch.from_numpy(image), label


def loader_dataset(kind: str, root: str, size: int, val_fraction: float):
    if kind == "folder":
        listing = imgs.list_images(root)
        train_idx, _ = imgs.split_indices(listing.paths, val_fraction)
        return FolderDataset(listing.absolute(train_idx), [listing.labels[i] for i in train_idx], size)
    from raydae.data.pack import read_manifest

    manifest = read_manifest(root)
    return ParquetDataset([os.path.join(root, s) for s in manifest["shards"]], size, val_fraction)


# ----------------------------------------------------------------------------- the arms
def compare(kind: str, root: str, size: int, args) -> dict:
    from raydae.data import build_datasets
    from raydae.tasks import AutoencoderTask

    data_cfg = DataConfig(source=root, image_size=size, shuffle_buffer=0)
    clock = benchlib.Stopwatch()
    bundle = build_datasets(data_cfg)  # a folder: every file is decoded once here (the bad-file check)
    preflight = clock()
    device = torch.device(args.device)
    dtypes = AutoencoderTask.batch_dtypes

    def ray_epoch() -> tuple[int, float, float]:
        start, count, first = time.perf_counter(), 0, None
        for batch in bundle.train.iter_torch_batches(batch_size=args.batch_size, drop_last=True, device=device,
                                                     dtypes=dtypes, prefetch_batches=4):
            first = first or time.perf_counter() - start
            count += len(batch["label"])
            _check({**batch, "image": model_input(batch["image"])}, size, device)
        _sync(device)
        return count, time.perf_counter() - start, first

    dataset = loader_dataset(kind, root, size, data_cfg.val_fraction)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         pin_memory=device.type == "cuda")

    def loader_epoch() -> tuple[int, float, float]:
        start, count, first = time.perf_counter(), 0, None
        for image, label in loader:
            first = first or time.perf_counter() - start
            batch = {"image": model_input(image.to(device, non_blocking=True)),
                     "label": label.to(device, non_blocking=True)}
            count += len(batch["label"])
            _check(batch, size, device)
        _sync(device)
        return count, time.perf_counter() - start, first

    ray_runs, loader_runs = [], []
    for epoch in range(args.epochs):
        loader_runs.append(loader_epoch())
        ray_runs.append(ray_epoch())
        print(f"  [{kind}] epoch {epoch}: DataLoader {loader_runs[-1][0] / loader_runs[-1][1]:.0f} img/s, "
              f"Ray Data {ray_runs[-1][0] / ray_runs[-1][1]:.0f} img/s"
              + ("  (warm-up, left out)" if epoch == 0 else ""), flush=True)
    del loader

    def rate(runs):
        return sum(r[0] for r in runs[1:]) / sum(r[1] for r in runs[1:])

    def first_batch(runs):
        return sum(r[2] for r in runs[1:]) / len(runs[1:])

    def after_first(runs):  # images/s from the first batch to the end of the epoch
        return sum(r[0] - args.batch_size for r in runs[1:]) / sum(r[1] - r[2] for r in runs[1:])

    ray_ips, loader_ips = rate(ray_runs), rate(loader_runs)
    return {
        "train_images": bundle.num_train,
        "ray_images_per_epoch": ray_runs[-1][0],
        "loader_images_per_epoch": loader_runs[-1][0],
        "preflight_seconds": preflight if kind == "folder" else None,
        "build_datasets_seconds": preflight,
        "in_memory": bundle.in_memory,
        "ray_images_per_second": ray_ips,
        "loader_images_per_second": loader_ips,
        "ratio": ray_ips / loader_ips,
        "ray_first_batch_seconds": first_batch(ray_runs),
        "loader_first_batch_seconds": first_batch(loader_runs),
        "ray_images_per_second_after_first_batch": after_first(ray_runs),
        "loader_images_per_second_after_first_batch": after_first(loader_runs),
        "ray_epochs": [r[0] / r[1] for r in ray_runs[1:]],
        "loader_epochs": [r[0] / r[1] for r in loader_runs[1:]],
        "warmup_epoch": {"ray_images_per_second": ray_runs[0][0] / ray_runs[0][1],
                         "loader_images_per_second": loader_runs[0][0] / loader_runs[0][1]},
    }


def _check(batch: dict, size: int, device: torch.device) -> None:
    """Every batch is what AutoencoderTask's model sees: float32 3 x S x S images on the device, int64 labels."""
    image, label = batch["image"], batch["label"]
    if (image.dtype != torch.float32 or tuple(image.shape[1:]) != (3, size, size) or label.dtype != torch.int64
            or image.device.type != device.type):
        raise SystemExit(f"unexpected batch: image {image.dtype} {tuple(image.shape)} on {image.device}, "
                         f"label {label.dtype}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_stage(args, source: str | None, size: int, workdir: str, name: str) -> dict:
    """A short stage 1 through raydae's own path; its train/data_wait_fraction and images/second."""
    from raydae import launch
    from raydae.data import build_datasets, training_dataset
    from raydae.storage import RunFolder

    overrides = [f"train.stage1_steps={args.stage_steps}", "data.val_size=256"]
    if source is not None:
        overrides += [f"data.source={source}", f"data.image_size={size}"]
    if args.device.startswith("cuda"):
        overrides.append("scaling.use_gpu=true")
    config = load_config(args.preset, overrides=overrides + args.overrides)
    bundle = build_datasets(config.data)
    run = RunFolder(os.path.join(workdir, "runs"), f"stage-{name}")
    clock = benchlib.Stopwatch()
    # As raydae.pipeline hands a stage its data: a small in-memory split repeated to a longer pass.
    result = launch.fit_stage(config, "stage1", run, {"train": training_dataset(bundle), "val": bundle.val})
    metrics = result["metrics"]
    print(f"  [stage {name}] {config.data.source}: data wait {100 * metrics['train/data_wait_fraction']:.1f}% "
          f"of step time, {metrics['train/images_per_second']:.0f} img/s", flush=True)
    return {"source": config.data.source, "steps": int(metrics["step"]), "train_images": bundle.num_train,
            "data_wait_fraction": metrics["train/data_wait_fraction"],
            "images_per_second": metrics["train/images_per_second"], "fit_seconds": clock(),
            "batch_size": config.train.batch_size, "in_memory": bundle.in_memory}


if __name__ == "__main__":
    main()
