"""Generator epoch from stored Parquet latents vs encoding images on the fly, same models, one run.

    python bench/latents_vs_images.py [--preset shapes] [--images 4096] [--set KEY=VALUE ...]

Both arms run the same generator training step (the preset's generator) on the same images through Ray
Data iterators in this process; the only difference is where the latents come from:
  on the fly:  images (Ray Data) -> frozen encoder forward -> generator step
  stored:      latents written once by raydae.latents (Parquet, Ray Data) -> generator step
The one-off cost of writing the latents is printed separately. Also printed: the share of the stored
arm's step time spent waiting for data (target: under 5%). Numbers are for this machine and preset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydae.config import load_config  # noqa: E402
from raydae.data import model_input  # noqa: E402
from raydae.tasks import AutoencoderTask, make_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    import ray

    from raydae.data import build_datasets
    from raydae.latents import encode_dataset, read_latents
    from raydae.loop import save_training_state

    config = load_config(args.preset, overrides=[f"data.train_size={args.images}", "data.val_size=256",
                                                 "data.shuffle_buffer=0", *args.overrides])
    if config.generator == "none":
        raise SystemExit("the preset trains no generator; pass --set generator=dit (or vq_prior)")
    torch.set_num_threads(max(1, config.scaling.torch_threads or 1))
    # address="local": always a new embedded Ray, never a stale cluster left in /tmp/ray.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)
    autoencoder = AutoencoderTask(config, "stage2")
    autoencoder.prepare(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "ckpt")
        os.makedirs(checkpoint)
        save_training_state(checkpoint, autoencoder, config, "stage2", 0, [])
        state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=False)
        bundle = build_datasets(config.data)
        bundle.train = bundle.train.materialize()  # both arms start from images already in memory
        t0 = time.perf_counter()
        latents = encode_dataset(config, checkpoint, state, bundle, tmp)
        write_seconds = time.perf_counter() - t0
        manifest = latents.manifest
        options = {"latent_shape": manifest["latent_shape"], "num_classes": len(manifest["label_names"]),
                   "latent_std": manifest.get("latent_std", 1.0)}
        task = make_task(config, "generator", options)
        task.load_previous_stage(state)
        task.prepare(torch.device("cpu"))
        batch = config.generator_train.batch_size
        stored = read_latents(latents.uri, "train").materialize()

        def encode(images: torch.Tensor) -> dict:
            with torch.no_grad():
                h = autoencoder.encoder(model_input(images))
                if config.ae.bottleneck == "vq":
                    return {"codes": autoencoder.bottleneck.encode_indices(h).flatten(1)}
                mean, logvar = autoencoder.bottleneck.encode(h)
                return {"mean": mean.flatten(1), "logvar": logvar.flatten(1)}

        def epoch(dataset, dtypes, transform=None):
            wait = total = 0.0
            steps = 0
            tick = time.perf_counter()
            for item in dataset.iter_torch_batches(batch_size=batch, drop_last=True, dtypes=dtypes):
                fetched = time.perf_counter()
                if steps:
                    wait += fetched - tick
                if transform is not None:
                    item = {**transform(item["image"]), "label": item["label"]}
                task.train_step(item, steps)
                steps += 1
                now = time.perf_counter()
                if steps > 1:
                    total += now - tick
                tick = now
            return steps, total, wait

        epoch(stored, task.batch_dtypes)  # warm-up: allocator, threads, first blocks
        n_fly, fly_seconds, fly_wait = epoch(bundle.train, {"image": torch.uint8, "label": torch.int64}, encode)
        n_stored, stored_seconds, stored_wait = epoch(stored, task.batch_dtypes)

    per_step_fly = fly_seconds / max(1, n_fly - 1)
    per_step_stored = stored_seconds / max(1, n_stored - 1)
    print(f"preset {args.preset}: generator {config.generator} ({config.dit.model if config.generator == 'dit' else config.prior.model}), "
          f"{args.images} images, batch {batch}, torch threads {torch.get_num_threads()}")
    print(f"writing latents once:         {write_seconds:7.2f} s")
    print(f"epoch, encoding on the fly:   {per_step_fly * 1000:7.1f} ms/step  ({n_fly} steps)")
    print(f"epoch, from Parquet latents:  {per_step_stored * 1000:7.1f} ms/step  ({n_stored} steps)")
    print(f"speed-up (on the fly / stored): {per_step_fly / per_step_stored:.2f}x  (target >= 3x)")
    print(f"data wait, stored latents:    {100 * stored_wait / max(stored_seconds, 1e-9):.1f}% of step time  (target < 5%)")
    ray.shutdown()


if __name__ == "__main__":
    main()
