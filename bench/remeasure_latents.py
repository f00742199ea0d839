"""Measure the latent spaces of finished runs again with today's measures (raydae.eval.latent_quality).

A new latent measure (e.g. the probe generator's loss) can be ranked against a sweep that ran before it
existed: this reads each run's final autoencoder checkpoint, encodes the same held-out `builtin:shapes`
images the run's pipeline measured (the first N of its val split), and writes the result beside the
run's own, as latent_quality.remeasured.json, and into metrics.json's latent_quality section (the old
values are kept under latent_quality_before). No Ray; one run at a time.

    python bench/remeasure_latents.py SWEEP_RUNS_FOLDER [--images 256] [--probe-steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root on sys.path)
import yaml

from raydae.data.datasets import render_shapes_batch
from raydae.latents import measure_latent_space


def held_out_images(config: dict, count: int) -> dict:
    data = config["data"]
    if data["source"] != "builtin:shapes":
        sys.exit(f"{data['source']}: only builtin:shapes runs can be re-measured here (their images re-render)")
    return render_shapes_batch({"id": range(count)}, data["seed"], "val", data["image_size"], data["max_shapes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of run folders (a sweep's runs/)")
    parser.add_argument("--images", type=int, default=256, help="held-out images (the sweep's latent_quality_images)")
    parser.add_argument("--probe-steps", type=int, default=200)
    args = parser.parse_args()
    runs = sorted(path.parent for path in Path(args.folder).glob("*/stage2.done.json"))
    runs += sorted(path.parent for path in Path(args.folder).glob("*/joint.done.json"))
    if not runs:
        sys.exit(f"{args.folder}: no finished autoencoder stage (stage2.done.json or joint.done.json) below it")
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        done = run / ("stage2.done.json" if (run / "stage2.done.json").exists() else "joint.done.json")
        checkpoint = json.loads(done.read_text())["checkpoint"]
        measures = measure_latent_space(checkpoint, held_out_images(config, args.images), args.images,
                                        use_gpu=False, probe_steps=args.probe_steps)
        (run / "latent_quality.remeasured.json").write_text(json.dumps(measures, indent=2))
        metrics_file = run / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            metrics.setdefault("latent_quality_before", metrics.get("latent_quality", {}))
            metrics["latent_quality"] = measures
            metrics_file.write_text(json.dumps(metrics, indent=2))
        print(f"{run.name}: probe generator loss {measures.get('probe_generator_loss', float('nan')):.4f}, "
              f"high-frequency share {measures['hf_energy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
