"""Ray Train overhead: steady-state images/second of one autoencoder stage through a 1-worker TorchTrainer
against a plain PyTorch loop over the same task, model, batch size and data, in one run.

    python bench/train_overhead.py [--preset shapes] [--stage stage1] [--steps 200] [--repeats 1]
                                   [--device cpu|cuda] [--dashboard] [--set KEY=VALUE ...] [--out FILE]

Arms (interleaved plain, Ray, plain, ... so load on the machine hits both alike):
  plain:      make_task(config, stage) + task.train_step in this process, batches sliced from the
              training split held in memory as tensors (pinned host memory on CUDA, copied per batch);
  Ray Train:  raydae.launch.fit_stage, the path `raydae run` takes: TorchTrainer(train_worker) with 1
              worker, fed by the Ray Dataset from raydae.data.build_datasets (what users run).
Both use the torch thread count train_worker sets (scaling.torch_threads, else cpus_per_worker) and the
same autocast setting (train.precision).

Steady state: both arms leave out the first `train.log_every` steps (start-up, allocator and thread-pool
warm-up). For Ray Train it is read from the worker's own TensorBoard windows (`<stage>/images_per_second`
every log_every steps, the first window dropped); the stage's final metric `train/images_per_second`
(measured from the first batch on) is printed beside it as a check.
Fixed start-up cost of a stage: wall time of fit() minus the time spent in steps (what train/
images_per_second implies), split into the part inside the worker loop (first batch + final evaluation)
and the part outside it (Ray Train start/stop, worker process, model build, final report).
Target: Ray Train / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402

from raydae.config import load_config  # noqa: E402
from raydae.tasks import make_task, warmup_scale  # noqa: E402

STAGE_STEPS_KEY = {"stage1": "train.stage1_steps", "stage2": "train.stage2_steps", "joint": "train.joint_steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--stage", default="stage1", choices=sorted(STAGE_STEPS_KEY))
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps per arm and repeat")
    parser.add_argument("--log-every", type=int, default=20,
                        help="train.log_every: the Ray worker's measuring window; the first window (and as "
                             "many plain steps) is start-up and left out")
    parser.add_argument("--repeats", type=int, default=1, help="Ray Train fits; plain runs = repeats + 1")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray with its dashboard, as `raydae run` does (default off: without it Ray "
                             "Train's placement-group cleaner can hold the end of each fit() for ~12 s)")
    parser.add_argument("--storage", default=None, help="where the Ray runs write (default: a temp folder)")
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/train_overhead-<time>.json)")
    args = parser.parse_args()
    benchlib.check_device(args.device)
    if args.steps <= 2 * args.log_every:
        raise SystemExit(f"--steps {args.steps} must exceed 2 x --log-every ({args.log_every}) to leave a steady window")

    overrides = [f"{STAGE_STEPS_KEY[args.stage]}={args.steps}", f"train.log_every={args.log_every}"]
    if args.device.startswith("cuda"):
        overrides.append("scaling.use_gpu=true")
    config = load_config(args.preset, overrides=overrides + args.overrides)
    if config.scaling.num_workers != 1:
        raise SystemExit("this bench compares one Ray Train worker with one plain loop; keep scaling.num_workers=1")
    if config.train.checkpoint_every <= args.steps:
        print(f"note: train.checkpoint_every={config.train.checkpoint_every} <= --steps: the Ray arm reports a "
              "checkpoint mid-stage (~2 s), and the window holding it counts in its steady state")
    threads = max(1, config.scaling.torch_threads or int(config.scaling.cpus_per_worker))  # as train_worker
    info = benchlib.machine(args.device)
    benchlib.warn_other_load(info)
    print(f"machine: {benchlib.describe(info)}")

    import math

    import ray

    from raydae import launch
    from raydae.data import build_datasets
    from raydae.storage import RunFolder

    scaling = config.scaling
    benchlib.init_ray(max(os.cpu_count() or 1, math.ceil(scaling.num_workers * scaling.cpus_per_worker) + 1),
                      args.device, dashboard=args.dashboard)
    storage = args.storage or tempfile.mkdtemp(prefix="raydae-bench-overhead-")
    try:
        clock = benchlib.Stopwatch()
        bundle = build_datasets(config.data)
        datasets = {"train": bundle.train, "val": bundle.val}
        images, labels = _in_memory(bundle.train, args.device)
        print(f"data: {config.data.source}, {len(images)} train / {bundle.num_val} val images "
              f"({clock():.1f}s to build and load into memory); batch {config.train.batch_size}, "
              f"{args.steps} steps per arm, torch threads {threads}, precision {config.train.precision}")

        plain_runs, ray_runs = [], []
        plain_runs.append(plain_arm(config, args.stage, args.steps, args.log_every, images, labels,
                                    args.device, threads, seed=0))
        _say("plain", plain_runs[-1])
        for repeat in range(args.repeats):
            ray_runs.append(ray_arm(launch, RunFolder, config, args.stage, storage, f"overhead-{repeat}",
                                    datasets, args.log_every))
            _say("ray", ray_runs[-1])
            plain_runs.append(plain_arm(config, args.stage, args.steps, args.log_every, images, labels,
                                        args.device, threads, seed=repeat + 1))
            _say("plain", plain_runs[-1])
    finally:
        ray.shutdown()
        if args.storage is None:
            shutil.rmtree(storage, ignore_errors=True)

    plain = _mean([r["steady_images_per_second"] for r in plain_runs])
    ray_steady = _mean([r["steady_images_per_second"] for r in ray_runs])
    ray_metric = _mean([r["metric_images_per_second"] for r in ray_runs])
    startup = _mean([r["fixed_seconds"] for r in ray_runs])
    ratio = ray_steady / plain
    rows = [
        ("plain PyTorch, steady img/s", plain, " ".join(f"{r['steady_images_per_second']:.0f}" for r in plain_runs)),
        ("Ray Train, steady img/s", ray_steady, " ".join(f"{r['steady_images_per_second']:.0f}" for r in ray_runs)),
        ("Ray Train, train/images_per_second", ray_metric,
         "from the 1st batch on (check: ~ steady)"),
        ("ratio Ray Train / plain (target >= 0.95)", ratio, "MET" if ratio >= 0.95 else "NOT MET"),
        ("Ray data wait, share of step time", _mean([r["data_wait_fraction"] for r in ray_runs]), ""),
        ("stage fixed cost: fit() - steps, s", startup, ""),
        ("  in the worker loop (1st batch + eval), s", _mean([r["fixed_in_worker_seconds"] for r in ray_runs]), ""),
        ("  outside it (Train start/stop, build, report), s",
         _mean([r["fixed_outside_worker_seconds"] for r in ray_runs]), ""),
        ("fit() wall time, s", _mean([r["fit_seconds"] for r in ray_runs]), ""),
    ]
    print()
    print(f"Ray Train overhead: preset {args.preset}, {args.stage}, {args.steps} steps, batch "
          f"{config.train.batch_size}, device {args.device}, torch threads {threads}")
    print(benchlib.table(rows, ("figure", "value", "runs / note")))
    path = benchlib.write_result(args.out, "train_overhead", {
        "machine": info,
        "settings": {"preset": args.preset, "stage": args.stage, "steps": args.steps, "log_every": args.log_every,
                     "repeats": args.repeats, "device": args.device, "dashboard": args.dashboard, "overrides": args.overrides,
                     "batch_size": config.train.batch_size, "torch_threads": threads,
                     "precision": config.train.precision, "train_images": len(images),
                     "val_images": bundle.num_val, "checkpoint_every": config.train.checkpoint_every},
        "summary": {"plain_images_per_second": plain, "ray_train_images_per_second": ray_steady,
                    "ray_train_metric_images_per_second": ray_metric, "ratio": ratio, "target_ratio": 0.95,
                    "target_met": ratio >= 0.95, "stage_fixed_seconds": startup},
        "plain_runs": plain_runs,
        "ray_runs": ray_runs,
    })
    print(f"wrote {path}")


def _say(arm: str, run: dict) -> None:
    print(f"  [{arm}] steady {run['steady_images_per_second']:.0f} img/s", flush=True)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _in_memory(dataset, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as two tensors (the same rows and normalisation the Ray arm reads)."""
    import numpy as np

    images, labels = [], []
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    x = torch.from_numpy(np.concatenate(images))  # uint8, as Ray Data delivers it: the task normalises per batch
    y = torch.from_numpy(np.concatenate(labels)).long()
    if device.startswith("cuda"):
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def plain_arm(config, stage: str, steps: int, warm: int, images: torch.Tensor, labels: torch.Tensor,
              device_name: str, threads: int, seed: int) -> dict:
    """The same task and step as train_worker, without Ray: in-memory batches, reshuffled every epoch."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed * 1000 + seed)
    device = torch.device(device_name)
    task = make_task(config, stage)
    task.prepare(device)
    train_config = task.train_config
    batch_size = train_config.batch_size
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.train.precision == "bf16"
                else torch.autocast(device_type=device.type, enabled=False))
    per_epoch = len(images) // batch_size
    if per_epoch == 0:
        raise SystemExit(f"{len(images)} training images hold no batch of {batch_size}")
    order = torch.randperm(len(images))
    started = time.perf_counter()
    steady_start = None
    for step in range(steps):
        if step == warm:
            _sync(device)
            steady_start = time.perf_counter()
        k = step % per_epoch
        if k == 0 and step:
            order = torch.randperm(len(images))
        idx = order[k * batch_size:(k + 1) * batch_size]
        batch = {"image": images[idx].to(device, non_blocking=True), "label": labels[idx].to(device, non_blocking=True)}
        with autocast:
            task.train_step(batch, step, lr_scale=warmup_scale(step, train_config.warmup_steps))
    _sync(device)
    ended = time.perf_counter()
    return {
        "steps": steps,
        "warm_steps_left_out": warm,
        "seconds": ended - started,
        "images_per_second": steps * batch_size / (ended - started),
        "steady_images_per_second": (steps - warm) * batch_size / (ended - steady_start),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ray_arm(launch, RunFolder, config, stage: str, storage: str, name: str, datasets: dict, log_every: int) -> dict:
    """One fresh stage through raydae.launch.fit_stage; steady state from the worker's TensorBoard windows."""
    run = RunFolder(storage, name)
    started = time.perf_counter()
    result = launch.fit_stage(config, stage, run, datasets)
    fit_seconds = time.perf_counter() - started
    metrics = result["metrics"]
    steps = int(metrics["step"])
    batch = config.train.batch_size
    step_seconds = steps * batch / metrics["train/images_per_second"]
    windows = _windows(run.child("tensorboard", stage), f"{stage}/images_per_second")
    steady = windows[1:]  # the first window holds the pipeline's start-up and the first steps
    if not steady:
        raise SystemExit(f"the Ray worker logged {len(windows)} windows; use more --steps or a smaller --log-every")
    window_images = log_every * batch
    steady_ips = len(steady) * window_images / sum(window_images / v for _, v in steady)
    return {
        "steps": steps,
        "fit_seconds": fit_seconds,
        "step_seconds": step_seconds,
        "metric_images_per_second": metrics["train/images_per_second"],
        "steady_images_per_second": steady_ips,
        "windows": [{"step": s, "images_per_second": v} for s, v in windows],
        "data_wait_fraction": metrics["train/data_wait_fraction"],
        "worker_seconds": metrics["train/seconds_this_attempt"],
        "fixed_seconds": fit_seconds - step_seconds,
        "fixed_in_worker_seconds": metrics["train/seconds_this_attempt"] - step_seconds,
        "fixed_outside_worker_seconds": fit_seconds - metrics["train/seconds_this_attempt"],
        "val": {k: v for k, v in metrics.items() if k.startswith("val/")},
    }


def _windows(logdir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        raise SystemExit(f"no {tag} scalars in {logdir}")
    return [(e.step, e.value) for e in acc.Scalars(tag)]


if __name__ == "__main__":
    main()
