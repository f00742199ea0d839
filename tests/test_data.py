"""raydae.data: shapes rendering, folder listing and split, bad files, Parquet packing, Ray Datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from raydae.config import DataConfig
from raydae.data import BAD_FILES_NAME, SHAPE_NAMES, build_datasets, pack_folder, render_shapes, source_fingerprint
from raydae.data import datasets
from raydae.data import images as imgs
from raydae.errors import UserError
from raydae.pixels import model_input, pil_arrays

SIZE = 16


# --------------------------------------------------------------------------------- helpers
def write_image(path, mode="RGB", size=(24, 20), seed=0, fmt=None):
    """A small noisy image in `mode`, saved by extension (or `fmt`)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(16)
    elif mode != "RGBA":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_class_folder(root, per_class=6):
    """cat/ and dog/ sub-folders with mixed modes, sizes and extensions; plus files that are not images."""
    modes = ["RGB", "L", "RGBA", "P", "LA", "RGB"]
    exts = [".png", ".jpg", ".PNG", ".webp", ".png", ".jpeg"]
    paths = []
    for c, name in enumerate(["dog", "cat"]):
        for i in range(per_class):
            mode, ext = modes[i % len(modes)], exts[i % len(exts)]
            if ext in (".jpg", ".jpeg") and mode in ("RGBA", "LA", "P"):
                mode = "RGB"
            size = (20 + 3 * i, 18 + 2 * c)
            paths.append(write_image(str(root / name / f"sub{i % 2}" / f"{name}{i}{ext}"), mode, size, seed=10 * c + i))
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(str(root / "dog" / "._hidden.png"))  # macOS resource-fork style: skipped
    return paths


def collect(ds, batch_size=8):
    """A data set's rows as model input (float in [-1, 1]), as the autoencoder task makes it from uint8."""
    images, labels = [], []
    for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8, "label": torch.int64}):
        assert set(batch) == {"image", "label"}
        images.append(model_input(batch["image"]))
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def as_sorted_pixels(images, labels):
    """Order-free comparison of two datasets' rows."""
    rows = [(int(l), pil_arrays(im[None])[0].tobytes()) for im, l in zip(images, labels)]
    return sorted(rows)


def folder_cfg(root, **kw):
    return DataConfig(source=str(root), image_size=SIZE, **{"val_fraction": 0.3, **kw})


# ------------------------------------------------------------------------------------ shapes
def test_shapes_are_deterministic_and_well_formed():
    a_img, a_lab = render_shapes(3, "train", range(40), image_size=32, max_shapes=3)
    b_img, b_lab = render_shapes(3, "train", range(40), image_size=32, max_shapes=3)
    assert a_img.dtype == np.uint8 and a_img.shape == (40, 32, 32, 3)
    assert a_lab.dtype == np.int64 and a_lab.shape == (40,)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert ((0 <= a_lab) & (a_lab < len(SHAPE_NAMES))).all()
    # Any subset renders alone to the same pixels (so workers can render disjoint ranges).
    sub_img, sub_lab = render_shapes(3, "train", [7, 31], image_size=32, max_shapes=3)
    np.testing.assert_array_equal(sub_img, a_img[[7, 31]])
    np.testing.assert_array_equal(sub_lab, a_lab[[7, 31]])
    # Other seed or split: other images.
    assert not np.array_equal(render_shapes(4, "train", range(40), 32, 3)[0], a_img)
    assert not np.array_equal(render_shapes(3, "val", range(40), 32, 3)[0], a_img)
    # Images are not flat, and every shape type turns up as a label.
    assert a_img.reshape(40, -1).std(axis=1).min() > 5
    _, many = render_shapes(0, "train", range(300), image_size=16, max_shapes=1)
    assert set(many.tolist()) == set(range(len(SHAPE_NAMES)))


@pytest.mark.ray
def test_shapes_datasets_iterate_as_model_input(ray_session):
    cfg = DataConfig(source="builtin:shapes", image_size=SIZE, train_size=40, val_size=12, seed=1, max_shapes=2)
    bundle = build_datasets(cfg)
    assert (bundle.num_train, bundle.num_val, bundle.label_names) == (40, 12, SHAPE_NAMES)
    images, labels = collect(bundle.train)
    assert images.dtype == torch.float32 and images.shape == (40, 3, SIZE, SIZE)
    assert labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.5 and images.max() > 0.5
    expected = render_shapes(1, "train", range(40), SIZE, 2)
    assert as_sorted_pixels(images, labels) == sorted(
        (int(l), im.tobytes()) for im, l in zip(*expected)
    )
    val_images, _ = collect(bundle.val)
    assert val_images.shape == (12, 3, SIZE, SIZE)


# ----------------------------------------------------------------------- listing, split, decode
def test_listing_labels_from_sub_folders(tmp_path):
    make_class_folder(tmp_path)
    listing = imgs.list_images(str(tmp_path))
    assert listing.label_names == ["cat", "dog"]
    assert len(listing.paths) == 12  # notes.txt and ._hidden.png are not images
    assert not any(p.endswith((".txt", "._hidden.png")) for p in listing.paths)
    for path, label in zip(listing.paths, listing.labels):
        assert listing.label_names[label] == path.split("/")[0]
    assert any(p.endswith(".PNG") for p in listing.paths) and any(p.endswith(".webp") for p in listing.paths)
    # Not class by class: the first half of the listing (evaluation takes a split's first images) holds both
    # classes, in an order fixed by the paths alone.
    assert set(listing.labels[:6]) == {0, 1}
    assert imgs.list_images(str(tmp_path)).paths == listing.paths


def test_listing_flat_folder_and_mixed_layout(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / "flat" / f"{i}.png"), seed=i)
    listing = imgs.list_images(str(tmp_path / "flat"))
    assert listing.label_names == ["none"] and listing.labels == [0, 0, 0]
    write_image(str(tmp_path / "flat" / "cls" / "x.png"))
    with pytest.raises(UserError, match="beside class sub-folders"):
        imgs.list_images(str(tmp_path / "flat"))


def test_split_is_deterministic_disjoint_and_complete():
    paths = [f"class{i % 3}/img_{i}.png" for i in range(500)]
    train, val = imgs.split_indices(paths, 0.2)
    assert (train, val) == imgs.split_indices(list(paths), 0.2)
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(500))
    assert 60 < len(val) < 140
    # A file's side depends on its own path only: adding files moves nobody.
    train2, val2 = imgs.split_indices(paths + ["class0/new.png"], 0.2)
    assert val2[: len(val)] == val


def test_modes_decode_to_rgb(tmp_path):
    for mode in ["L", "LA", "RGBA", "P", "RGB", "I;16"]:
        path = write_image(str(tmp_path / f"{mode.replace(';', '')}.png"), mode, size=(30, 20))
        with open(path, "rb") as f:
            data = f.read()
        img = imgs.open_rgb(data)
        assert img.mode == "RGB" and img.size == (30, 20)
        square = imgs.load_square(data, SIZE)
        assert square.shape == (SIZE, SIZE, 3) and square.dtype == np.uint8
    chw = torch.from_numpy(imgs.to_chw(np.array([[[[0, 255, 128]]]], dtype=np.uint8)))
    assert chw.dtype == torch.uint8 and chw.shape == (1, 3, 1, 1)
    x = model_input(chw)  # what the tasks do on the device
    assert x.dtype == torch.float32 and x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert torch.equal(model_input(x), x)  # float model input passes as it is
    with pytest.raises(TypeError, match="uint8"):
        model_input(torch.zeros(1, 3, 1, 1, dtype=torch.int64))


# --------------------------------------------------------------------------------- errors
def test_source_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        build_datasets(DataConfig(source=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"no images found .*\.png, \.jpg, \.jpeg, \.webp"):
        build_datasets(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="is a file"):
        build_datasets(DataConfig(source=str(tmp_path / "empty" / "readme.txt")))
    with pytest.raises(UserError, match="unknown built-in"):
        build_datasets(DataConfig(source="builtin:digits"))


# ------------------------------------------------------------------------------ Ray: folders
@pytest.mark.ray
def test_folder_datasets(ray_session, tmp_path):
    paths = make_class_folder(tmp_path / "data")
    bundle = build_datasets(folder_cfg(tmp_path / "data"))
    assert bundle.label_names == ["cat", "dog"] and bundle.skipped_files == []
    assert bundle.num_train + bundle.num_val == len(paths) and bundle.num_val > 0
    train_x, train_y = collect(bundle.train, batch_size=5)
    val_x, val_y = collect(bundle.val)
    assert train_x.shape == (bundle.num_train, 3, SIZE, SIZE) and val_x.shape == (bundle.num_val, 3, SIZE, SIZE)
    assert train_x.dtype == torch.float32 and train_x.min() >= -1 and train_x.max() <= 1
    # Same pixels and labels as decoding each file directly, and train and val are disjoint.
    listing = imgs.list_images(str(tmp_path / "data"))
    expected = []
    for rel, label, path in zip(listing.paths, listing.labels, listing.absolute()):
        with open(path, "rb") as f:
            expected.append((label, imgs.load_square(f.read(), SIZE).tobytes()))
    got = as_sorted_pixels(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]))
    assert got == sorted(expected)


@pytest.mark.ray
def test_bad_files_error_and_skip(ray_session, tmp_path):
    root = tmp_path / "data"
    for i in range(8):
        write_image(str(root / f"ok{i}.png"), seed=i)
    good = write_image(str(tmp_path / "big.png"), size=(64, 64))
    data = open(good, "rb").read()
    truncated = root / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = root / "notes.png"
    text.write_text("this is text, not a PNG")

    with pytest.raises(UserError) as info:
        build_datasets(folder_cfg(root))
    message = str(info.value)
    assert "\n" not in message and "on_bad_file=skip" in message
    assert str(truncated) in message or str(text) in message

    report = tmp_path / "run"
    bundle = build_datasets(folder_cfg(root, on_bad_file="skip"), report_dir=str(report))
    assert sorted(p for p, _ in bundle.skipped_files) == sorted([str(truncated), str(text)])
    assert bundle.num_train + bundle.num_val == 8
    lines = (report / BAD_FILES_NAME).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted([str(truncated), str(text)])
    assert all(line.split("\t")[1] for line in lines)
    assert bundle.train.count() + bundle.val.count() == 8


@pytest.mark.ray
def test_every_file_bad_and_empty_val(ray_session, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match="all 3 image files are unreadable"):
        build_datasets(folder_cfg(bad, on_bad_file="skip"))
    for i in range(2):
        write_image(str(tmp_path / "two" / f"{i}.png"), seed=i)
    with pytest.raises(UserError, match="validation split is empty.*raise data.val_fraction"):
        build_datasets(folder_cfg(tmp_path / "two", val_fraction=0.001))


# ------------------------------------------------------------------------------- Ray: Parquet
@pytest.mark.ray
@pytest.mark.parametrize("pack_size", [SIZE, None])
def test_pack_round_trip(ray_session, tmp_path, pack_size):
    src = tmp_path / "data"
    make_class_folder(src, per_class=4)
    (src / "dog" / "broken.png").write_text("nope")
    with pytest.raises(UserError, match="broken.png"):
        pack_folder(str(src), str(tmp_path / "fail"), image_size=pack_size)
    assert not (tmp_path / "fail").exists() and os.listdir(tmp_path) == ["data"]  # nothing half-written

    dst = tmp_path / "packed"
    manifest = pack_folder(str(src), str(dst), image_size=pack_size, shard_size=3, on_bad_file="skip")
    assert manifest["count"] == 8 and manifest["label_names"] == ["cat", "dog"]
    assert manifest["image_size"] == pack_size and len(manifest["shards"]) == 3
    assert [s[0] for s in manifest["skipped"]] == ["dog/broken.png"]
    assert json.loads((dst / "manifest.json").read_text()) == manifest
    with pytest.raises(UserError, match="not empty"):
        pack_folder(str(src), str(dst))

    (src / "dog" / "broken.png").unlink()
    from_folder = build_datasets(folder_cfg(src))
    from_parquet = build_datasets(folder_cfg(dst))
    assert from_parquet.label_names == from_folder.label_names
    assert (from_parquet.num_train, from_parquet.num_val) == (from_folder.num_train, from_folder.num_val)
    for split in ("train", "val"):
        px, py = collect(getattr(from_parquet, split))
        fx, fy = collect(getattr(from_folder, split))
        assert px.shape == (len(py), 3, SIZE, SIZE) and px.dtype == torch.float32
        assert as_sorted_pixels(px, py) == as_sorted_pixels(fx, fy)


# ------------------------------------------------------------- progress and bad packs (no Ray)
def test_pack_says_how_far_it_is(tmp_path, capsys):
    make_class_folder(tmp_path / "data", per_class=3)
    pack_folder(str(tmp_path / "data"), str(tmp_path / "packed"), image_size=SIZE)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[pack] packing ") and lines[0].endswith("started (6 images)")
    assert lines[-1].startswith("[pack] packing ") and "done, 6/6 images (100%)" in lines[-1]
    assert "6 packed into 1 shard(s)" in lines[-1]


def test_source_fingerprint_reports_a_slow_walk_and_keeps_its_value(tmp_path, capsys):
    import hashlib

    make_class_folder(tmp_path / "data", per_class=2)
    assert source_fingerprint("builtin:shapes") == ""
    quiet = source_fingerprint(str(tmp_path / "data"))
    assert capsys.readouterr().out == ""  # a fast walk says nothing
    assert source_fingerprint(str(tmp_path / "data"), every_s=0.0) == quiet
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("[data] fingerprinting ") for line in lines)
    assert "done" in lines[-1] and "files" in lines[-1]
    # The digest latents and evaluation caches are keyed by: the listing order's name, then paths, sizes and
    # modification times.
    digest = hashlib.sha256(imgs.LISTING_ORDER.encode())
    for folder, dirs, files in os.walk(tmp_path / "data"):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), tmp_path / "data")
            digest.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    assert quiet == digest.hexdigest()


def test_pack_with_a_missing_or_broken_shard_is_refused_in_one_line(tmp_path):
    make_class_folder(tmp_path / "data", per_class=4)
    packed = tmp_path / "packed"
    manifest = pack_folder(str(tmp_path / "data"), str(packed), image_size=SIZE, shard_size=3)
    (packed / manifest["shards"][1]).unlink()
    with pytest.raises(UserError) as info:
        build_datasets(folder_cfg(packed))
    assert "\n" not in str(info.value)
    assert f"shard {manifest['shards'][1]} listed in manifest.json is missing; pack the folder again" in str(info.value)
    (packed / manifest["shards"][1]).write_bytes(b"PAR1 truncated")
    with pytest.raises(UserError, match=r"data shard .*shard-00001.parquet cannot be read \(.*\); pack the folder"):
        build_datasets(folder_cfg(packed))


# --------------------------------------------------- Ray: progress, small sets in memory, batch size
@pytest.mark.ray
def test_folder_check_says_how_far_it_is_and_a_small_set_stays_in_memory(ray_session, tmp_path, capsys):
    make_class_folder(tmp_path / "data")
    bundle = build_datasets(folder_cfg(tmp_path / "data"))
    lines = capsys.readouterr().out.splitlines()
    assert "[data] checking that every image file decodes: started (12 files)" in lines
    assert any(line.startswith("[data] checking that every image file decodes: done, 12/12 files") for line in lines)
    assert bundle.in_memory  # 12 tiny images: decoded once, not again every epoch
    first, second = collect(bundle.train), collect(bundle.train)
    assert as_sorted_pixels(*first) == as_sorted_pixels(*second) and len(first[1]) == bundle.num_train



@pytest.mark.ray
def test_training_dataset_repeats_a_small_in_memory_split(ray_session, monkeypatch):
    monkeypatch.setattr(datasets, "ROWS_PER_PASS", 100)
    bundle = build_datasets(DataConfig(source="builtin:shapes", image_size=SIZE, train_size=40, val_size=8))
    images, labels = collect(datasets.training_dataset(bundle))
    assert len(labels) == 120  # three copies: every image three times
    once = as_sorted_pixels(*collect(bundle.train))
    assert as_sorted_pixels(images, labels) == sorted(once * 3)
