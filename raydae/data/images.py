"""Image files without Ray: listing a folder, the train/val split, decoding and normalising.

Shared by the folder and Parquet sources and by `pack`, so every path from bytes to model input is
the same code: a packed image and the file it came from give identical pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from raydae.errors import UserError
from raydae.progress import Progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # matched case-insensitively
NO_LABEL = "none"  # label_names of a folder whose images are not sorted into sub-folders
LISTING_ORDER = "path-hash order"  # in every folder's fingerprint: a change of listing order makes new caches


# ---------------------------------------------------------------------------------- listing
@dataclass
class ImageListing:
    root: str  # absolute path of the folder
    paths: list[str]  # relative to root, "/"-separated, sorted
    labels: list[int]
    label_names: list[str]

    def absolute(self, indices=None) -> list[str]:
        chosen = range(len(self.paths)) if indices is None else indices
        return [os.path.join(self.root, *self.paths[i].split("/")) for i in chosen]


def list_images(root: str) -> ImageListing:
    """Every image under `root` (recursive; hidden files and folders skipped, e.g. macOS `._x.png`).

    Images in sub-folders are labelled by the first sub-folder's name (sorted names -> 0, 1, ...);
    a folder with images only at its top level gets one label, "none". A mix of both is refused,
    since the top-level images would have no class. Listed in a fixed pseudo-random order (`listing_order`),
    not class by class: evaluation's "first N images" of a split are then a sample of every class.
    """
    root = os.path.abspath(root)
    paths = []
    seen = set()  # real paths of visited folders: symlinked folders are followed, loops are not
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                rel = name if rel_folder == "." else f"{rel_folder}/{name}"
                paths.append(rel.replace(os.sep, "/"))
    paths.sort(key=listing_order)
    if not paths:
        raise UserError(
            f"data.source={root}: no images found (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); point it at the folder that holds the images"
        )
    top_level = [p for p in paths if "/" not in p]
    if len(top_level) == len(paths):
        return ImageListing(root, paths, [0] * len(paths), [NO_LABEL])
    if top_level:
        raise UserError(
            f"data.source={root}: {len(top_level)} images (e.g. {top_level[0]}) sit beside class "
            f"sub-folders; move them into a sub-folder or out of the folder"
        )
    label_names = sorted({p.split("/", 1)[0] for p in paths})
    return ImageListing(root, paths, [label_of(p, label_names) for p in paths], label_names)


def listing_order(rel_path: str) -> tuple[bytes, str]:
    """Sort key of a file in a listing: a hash of its path alone (stable across runs, machines and additions;
    salted apart from `is_val`'s, so the order inside a split is not the split's hash order)."""
    return hashlib.md5(f"order:{rel_path}".encode("utf-8")).digest(), rel_path


def source_fingerprint(source: str, every_s: float = 10.0) -> str:
    """What is in a folder source now (paths, sizes, modification times), so changed data gets new caches.

    "" for a built-in source. Stats every file, which on a network disk with many files takes a while: past
    `every_s` seconds it says how many files it has seen (silent for a folder that takes less)."""
    root = os.path.abspath(os.path.expanduser(source))
    if source.startswith("builtin:") or not os.path.isdir(root):
        return ""
    progress = Progress("data", f"fingerprinting {root} (stat of every file)", unit="files", every_s=every_s,
                        announce=False)
    digest = hashlib.sha256(LISTING_ORDER.encode())  # caches of the class-by-class listing are not reused
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            progress.advance()
    if progress.elapsed() >= every_s:
        progress.finish()
    return digest.hexdigest()


def label_of(rel_path: str, label_names: list[str] | dict[str, int]) -> int:
    """Label of a relative path: its first folder's index in label_names (0 for top-level files)."""
    if "/" not in rel_path:
        return 0
    first = rel_path.split("/", 1)[0]
    if isinstance(label_names, dict):
        return label_names[first]
    return label_names.index(first)


# ------------------------------------------------------------------------------------ split
def is_val(rel_path: str, val_fraction: float) -> bool:
    """Stable across runs, machines and file additions: a file's side depends on its path alone."""
    digest = hashlib.md5(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def split_indices(rel_paths: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, val indices) into rel_paths."""
    train, val = [], []
    for i, path in enumerate(rel_paths):
        (val if is_val(path, val_fraction) else train).append(i)
    return train, val


# --------------------------------------------------------------------------------- decoding
def open_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later) and convert to RGB.

    Grayscale, RGBA (alpha dropped), palette and CMYK images become RGB; EXIF rotation is applied.
    `draft_size` lets JPEG decode at a reduced scale that still covers draft_size x draft_size,
    which makes large photos much cheaper when they are only going to be shrunk.
    """
    img = Image.open(io.BytesIO(data))
    if draft_size:
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the direct P -> RGB conversion warns about this case
    return img if img.mode == "RGB" else img.convert("RGB")


def describe_error(err: BaseException) -> str:
    """One short line for a decoding failure (PIL's own messages can name a BytesIO object)."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a readable image (unknown format or corrupt header)"
    text = " ".join(str(err).split())
    return text or err.__class__.__name__


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bilinear, antialiased) and centre-crop: uint8 size x size x 3."""
    width, height = img.size
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Crop and resize in one step: PIL samples the centre square straight into size x size.
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8)


def load_square(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 size x size x 3 RGB."""
    return fit_square(open_rgb(data, draft_size=size), size)


def decode_squares(blobs, names, size: int) -> np.ndarray:
    """Encoded images -> uint8 N x size x size x 3; a failure names its file (`names`, same order)."""
    squares = []
    for data, name in zip(blobs, names):
        try:
            squares.append(load_square(data, size))
        except Exception as err:  # noqa: BLE001 - re-raised with the file's name, which PIL leaves out
            raise ValueError(f"image {name} does not decode: {describe_error(err)}") from err
    return np.stack(squares) if squares else np.zeros((0, size, size, 3), dtype=np.uint8)


def to_chw(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 -> uint8 N x 3 x H x W: what every data set yields as `image`.

    Images travel through Ray Data as uint8 (4x fewer bytes than float32 through the object store and to
    the GPU); the model side turns them into its input with `pixels.model_input`, on the device.
    """
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))

