"""Training data as Ray Datasets (driver side); see datasets.py for the sources.

    bundle = build_datasets(config.data, report_dir=run_dir)
    TorchTrainer(..., datasets={"train": training_dataset(bundle), "val": bundle.val})
    # on a worker:
    ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=..., dtypes={"image": torch.uint8, "label": torch.int64})
    images = raydae.pixels.model_input(batch["image"])  # float32 in [-1, 1], made on the device

Rows hold exactly `image` (uint8, 3 x S x S) and `label` (int64).
"""

from raydae.data.datasets import (
    BAD_FILES_NAME, DataBundle, bad_files_text, build_datasets, check_source, training_dataset,
)
from raydae.data.images import source_fingerprint
from raydae.data.pack import pack_folder
from raydae.data.shapes import SHAPE_NAMES, render_shapes

__all__ = [
    "BAD_FILES_NAME", "DataBundle", "SHAPE_NAMES", "bad_files_text", "build_datasets", "check_source",
    "pack_folder", "render_shapes", "source_fingerprint", "training_dataset",
]
