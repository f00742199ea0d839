"""`raydae data pack`: an image folder -> Parquet shards + manifest.json (plain Python, no Ray).

Many small files are slow to list and read on shared or object storage; a few Parquet shards are
not. Each row holds `image` (PNG bytes, already resized and centre-cropped when image_size is given),
`label` (int64) and `path` (relative to the source folder, which also decides the train/val split).
Everything is written into a hidden folder beside `dst` and renamed into place at the end, so a
crash never leaves a half-written data set that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raydae.data import images as imgs
from raydae.errors import UserError
from raydae.progress import Progress

MANIFEST_NAME = "manifest.json"
FORMAT = "raydae-parquet-v1"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
ROW_GROUP = 256  # rows buffered before a write: memory stays small even for full-size photos


def pack_folder(
    src: str, dst: str, *, image_size: int | None = None, shard_size: int = 1000, on_bad_file: str = "error"
) -> dict:
    """Pack the images under `src` into `dst` (which must be new or empty); returns the manifest."""
    if on_bad_file not in ("error", "skip"):
        raise UserError(f"pack: on_bad_file must be error or skip, got {on_bad_file!r}")
    if shard_size <= 0 or (image_size is not None and image_size <= 0):
        raise UserError("pack: shard_size and image_size must be positive")
    src, dst = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(dst))
    if not os.path.isdir(src):
        raise UserError(f"pack: {src}: no such folder; give the folder that holds the images")
    if os.path.isfile(os.path.join(src, MANIFEST_NAME)):
        raise UserError(f"pack: {src} is already a packed data set; use it as data.source directly")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise UserError(f"pack: {dst} exists and is not empty; choose a new folder (nothing was written)")
    listing = imgs.list_images(src)
    progress = Progress("pack", f"packing {src} into {dst}", total=len(listing.paths), unit="images")

    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.packing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = _write_shards(listing, tmp, image_size, shard_size, on_bad_file, progress)
        _write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked above); rename needs the name free
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.finish(f"{manifest['count']} packed into {len(manifest['shards'])} shard(s)"
                    + (f", {len(manifest['skipped'])} unreadable skipped" if manifest["skipped"] else ""))
    return manifest


def _write_shards(
    listing: imgs.ImageListing, out: str, image_size: int | None, shard_size: int, on_bad_file: str,
    progress: Progress,
) -> dict:
    shards: list[str] = []
    skipped: list[list[str]] = []
    rows: dict[str, list] = {"image": [], "label": [], "path": []}
    writer: pq.ParquetWriter | None = None
    in_shard = 0
    count = 0

    def flush() -> None:
        if rows["path"]:
            writer.write_table(pa.table(rows, schema=SCHEMA))
            for column in rows.values():
                column.clear()

    for rel_path, label, path in zip(listing.paths, listing.labels, listing.absolute()):
        try:
            with open(path, "rb") as f:
                png = _encode_png(f.read(), image_size)
        except Exception as err:  # noqa: BLE001 - any failure makes the file unusable; say why
            reason = imgs.describe_error(err)
            if on_bad_file == "error":
                raise UserError(
                    f"bad image file {path}: {reason}; remove or fix it, or pack with on_bad_file=skip"
                ) from None
            skipped.append([rel_path, reason])
            progress.advance()
            continue
        if writer is None:
            shards.append(f"shard-{len(shards):05d}.parquet")
            writer = pq.ParquetWriter(os.path.join(out, shards[-1]), SCHEMA)
        rows["image"].append(png)
        rows["label"].append(label)
        rows["path"].append(rel_path)
        in_shard += 1
        count += 1
        if len(rows["path"]) >= ROW_GROUP:
            flush()
        if in_shard >= shard_size:
            flush()
            writer.close()
            writer, in_shard = None, 0
        progress.advance()
    if writer is not None:
        flush()
        writer.close()
    if count == 0:
        raise UserError(f"pack: all {len(skipped)} image files under {listing.root} are unreadable "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    return {
        "format": FORMAT,
        "count": count,
        "image_size": image_size,
        "label_names": listing.label_names,
        "shards": shards,
        "skipped": skipped,
        "source": listing.root,
    }


def _encode_png(data: bytes, image_size: int | None) -> bytes:
    """Bytes of any supported image -> RGB PNG bytes, resized exactly as training would resize it."""
    if image_size is None:
        pixels = np.asarray(imgs.open_rgb(data))
    else:
        pixels = imgs.load_square(data, image_size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- reading back
def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(
            f"data.source={root}: cannot read {MANIFEST_NAME} ({imgs.describe_error(err)}); pack the folder again"
        ) from None
    keys = ("count", "label_names", "shards")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or any(k not in manifest for k in keys):
        raise UserError(
            f"data.source={root}: {MANIFEST_NAME} is not a {FORMAT} manifest; "
            f"pack the folder again with `raydae data pack`"
        )
    missing = [s for s in manifest["shards"] if not os.path.isfile(os.path.join(root, s))]
    if missing:
        raise UserError(
            f"data.source={root}: shard {missing[0]} listed in {MANIFEST_NAME} is missing; pack the folder again"
        )
    manifest.setdefault("skipped", [])
    return manifest


def read_paths(shards: list[str]) -> list[str]:
    """The `path` column of every shard (small: no image bytes are read); an unreadable shard is named."""
    paths = []
    for shard in shards:
        try:
            paths += pq.read_table(shard, columns=["path"]).column("path").to_pylist()
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"data shard {shard} cannot be read ({imgs.describe_error(err)}); pack the folder "
                            "again") from None
    return paths
