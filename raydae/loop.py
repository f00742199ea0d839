"""The one training skeleton, run on every Ray Train worker, for every stage.

It is the only module that knows the Train worker API (`get_context`, `get_checkpoint`,
`get_dataset_shard`, `report`). What is trained, frozen and logged comes from the task (`tasks/`); the
checkpoint format is `checkpoints.py`'s.

Per worker: restore from the latest registered checkpoint (Ray hands it back after a worker failure
and when the same run name is started again), else start from the previous stage's checkpoint when
there is one; iterate the dataset shard for `steps` optimisation steps; every `checkpoint_every` steps
rank 0 saves the full training state and every rank calls `report` (it is a barrier, and costs ~2 s);
rank 0 writes TensorBoard scalars and image grids and prints a progress line every `log_every` steps;
at the end rank 0 evaluates on the validation split and reports a final checkpoint with the metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

import ray.train
import ray.train.torch

from raydae.checkpoints import load_checkpoint_state, load_state, prepare_for_training, save_training_state
from raydae.config import Config
from raydae.latents import latent_batches
from raydae.probe import SampleProbe
from raydae.seeds import derive_seed
from raydae.tasks import Task, make_task, warmup_scale


START_OF_DATA = {"pass": 0, "batch": 0}


class StepWindow:
    """What the steps since the window opened did: summed logs, images, and seconds waiting for data and in all."""

    def __init__(self) -> None:
        self.opened = time.perf_counter()
        self.steps, self.images = 0, 0
        self.waiting = self.busy = 0.0
        self.sums: dict[str, torch.Tensor | float] = {}  # on the device until `means()` reads them

    def add(self, logs: dict[str, torch.Tensor | float], images: int, waiting: float, busy: float) -> None:
        self.steps += 1
        self.images += images
        self.waiting += waiting
        self.busy += busy
        for key, value in logs.items():
            # In float32: a bf16 log (autocast) summed in bf16 stops growing at 256 (500 steps of 1.0 give 0.512).
            value = value.detach().float() if isinstance(value, torch.Tensor) else value
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        return {key: float(value) / self.steps for key, value in self.sums.items()}

    def images_per_second(self) -> float:
        """Over the wall-clock time since the window opened (bookkeeping between steps included)."""
        return self.images / (time.perf_counter() - self.opened)

    def wait_fraction(self) -> float:
        return self.waiting / max(self.busy, 1e-9)


def resumable_batches(open_pass: Callable[[int], Iterable], start_pass: int = 0, skip: int = 0,
                      empty_error: str = "the training split gave no batch") -> Iterator[tuple[int, int, Any]]:
    """(pass, index in the pass, batch) over passes through the training data, from pass `start_pass` after its
    first `skip` batches: where a checkpoint left off, so a resumed stage neither sees the start of a pass again
    nor misses its end. `open_pass(p)` iterates pass p; its shuffle is seeded by p, so a pass opened again comes
    in the same order where the data's order is fixed (an in-memory set on one worker; elsewhere the skipped
    count is still right). Raises RuntimeError(empty_error) when a pass gives no batch at all."""
    number = start_pass
    while True:
        seen = 0
        for seen, batch in enumerate(open_pass(number), start=1):
            if seen > skip:
                yield number, seen - 1, batch
        if seen == 0:
            raise RuntimeError(empty_error)
        number, skip = number + 1, 0


def _held_out_batches(loop_config: dict, task: Task, batch_size: int, device: torch.device):
    """The held-out split rank 0 evaluates: stored latents straight from their Parquet files (a small set, read
    once: a Ray Data execution would start up for longer than the read), images through the "val" dataset."""
    if loop_config.get("val_latents"):
        columns = tuple(task.batch_dtypes)
        for batch in latent_batches(loop_config["val_latents"], columns, batch_size=batch_size):
            yield {name: torch.from_numpy(batch[name]).to(device, task.batch_dtypes[name]) for name in columns}
    else:
        yield from ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=batch_size, device=device, dtypes=task.batch_dtypes)


def _restore(task: Task, loop_config: dict, device: torch.device) -> tuple[dict | None, bool]:
    """Load the latest registered checkpoint (a retry or a restarted run), else the previous stage's weights;
    prepare the task on `device`. Returns the checkpoint's state (None on a fresh start) and whether Ray
    handed one back."""
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(folder)
    previous_stage = (load_checkpoint_state(loop_config["init_from"])
                      if state is None and loop_config.get("init_from") else None)
    prepare_for_training(task, device, state=state, previous_stage=previous_stage, wrap=ray.train.torch.prepare_model)
    return state, checkpoint is not None


def train_worker(loop_config: dict) -> None:
    config = Config.from_dict(loop_config["config"])
    stage: str = loop_config["stage"]
    steps: int = loop_config["steps"]
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, config.scaling.torch_threads or int(config.scaling.cpus_per_worker)))
    torch.manual_seed(derive_seed(train.seed, rank, stride=1000))
    device = ray.train.torch.get_device()

    task = make_task(config, stage, loop_config.get("latent_facts"))
    state, resumed = _restore(task, loop_config, device)
    step = state["step"] if state else 0
    # Reseed by step, so a resumed attempt does not replay the random stream (noise, dropout) from step 0.
    torch.manual_seed(derive_seed(derive_seed(train.seed, step), rank, stride=1009))
    # `history` records where each attempt started, so a resumed run can show it did not start over.
    # Where in the training data the checkpoint left off: pass number and batches of it already used (replaced,
    # never changed in place, as training goes on).
    position = (state or {}).get("data_position") or START_OF_DATA
    history = (state["history"] if state else []) + [{"attempt_start_step": step, "world_size": world,
                                                      "data_position": position}]

    probe = None  # rank 0 scores a fixed-noise sample at every report: the sweep's comparable signal
    if rank == 0 and loop_config.get("probe"):
        gen = config.generator_train
        probe = SampleProbe(loop_config["probe"], gen.probe_samples, gen.probe_sample_steps)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard_dir = loop_config["tensorboard_dir"] or tempfile.mkdtemp(prefix="raydae-tb-")
        writer = SummaryWriter(tensorboard_dir)
        if step:
            print(f"[{stage}] resuming from step {step}/{steps}", flush=True)

    train_config = task.train_config  # batch size, warm-up, logging and checkpoint cadence of this stage
    per_worker_batch = train_config.batch_size // world
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if train.precision == "bf16"
        else torch.autocast(device_type=device.type, enabled=False)
    )
    shard = ray.train.get_dataset_shard("train")
    attempt = StepWindow()  # the whole attempt
    progress = StepWindow()  # since the last progress line (after a resume the first is shorter than log_every)
    since_report = StepWindow()  # losses since the last report: what Tune's schedulers compare
    sample_batch = None

    shuffle = config.data.shuffle_buffer

    def open_pass(number: int):
        return shard.iter_torch_batches(
            batch_size=per_worker_batch, drop_last=True, device=device,
            dtypes=task.batch_dtypes,
            # A few batches in flight hide the pipeline's restart at each pass's start.
            prefetch_batches=4,
            # Pinned host batches (collated in Ray's prefetch threads) make the copy to the GPU asynchronous.
            pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=derive_seed(train.seed, number, rank) if shuffle else None,
        )

    # Data wait is the time from the end of one step's bookkeeping (logging, images, checkpoints) to the next
    # batch in hand. `tick` runs on across passes, so draining one pass and restarting the pipeline for the
    # next count as waiting too.
    tick = time.perf_counter()
    batches = resumable_batches(open_pass, position["pass"], position["batch"],
                                empty_error=f"the training split gave worker {rank} no batch of {per_worker_batch} "
                                            "images; use a smaller train.batch_size or more data")
    if step < steps:
        for pass_number, index, batch in batches:
            position = {"pass": pass_number, "batch": index + 1}
            fetched = time.perf_counter()
            if attempt.steps == 0:
                tick = fetched  # the first fetch is the pipeline's start-up, not steady-state waiting
            if sample_batch is None:
                sample_batch = {k: v[:16].clone() for k, v in batch.items()}
            if train.fail_at_step == step and not resumed and stage != "generator":
                # Fault injection for tests: fail once, on a fresh start only, so the retry can resume.
                raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")
            with autocast:
                lr_scale = warmup_scale(step, train_config.warmup_steps, steps, train_config.lr_schedule)
                logs = task.train_step(batch, step, lr_scale=lr_scale)
            step += 1
            tock = time.perf_counter()
            for window in (attempt, progress, since_report):
                window.add(logs, per_worker_batch * world, fetched - tick, tock - tick)

            if step % train_config.log_every == 0:
                if writer is not None:
                    _log_progress(writer, task, stage, step, steps, progress)
                progress = StepWindow()
            if writer is not None and step % train_config.image_every == 0 and sample_batch is not None:
                writer.add_image(f"{stage}/{task.image_tag}", task.image_grid(sample_batch), step)
            if step % train_config.checkpoint_every == 0 and step < steps:
                _upload_tensorboard(writer, loop_config.get("tensorboard_upload"))
                means = since_report.means()
                if probe is not None:
                    means.update(_run_probe(probe, task, writer, stage, step))
                _report(task, config, stage, step, history, {"step": step, **means}, rank, position)
                since_report = StepWindow()
            tick = time.perf_counter()
            if step >= steps:
                break

    metrics = {"step": step}
    if rank == 0:
        metrics.update(task.evaluate(_held_out_batches(loop_config, task, per_worker_batch, device)))
        if attempt.steps:
            metrics["train/images_per_second"] = attempt.images / max(attempt.busy, 1e-9)
            metrics["train/data_wait_fraction"] = attempt.wait_fraction()
        if probe is not None:
            metrics.update(_run_probe(probe, task, writer, stage, step))
        metrics["train/seconds_this_attempt"] = time.perf_counter() - attempt.opened
        metrics["parameters"] = task.parameter_counts()
        metrics["history"] = history
        for key, value in metrics.items():
            if isinstance(value, float) and key.startswith("val/"):
                writer.add_scalar(f"{stage}/{key}", value, step)
        if sample_batch is not None and step % train_config.image_every:
            writer.add_image(f"{stage}/{task.image_tag}", task.image_grid(sample_batch), step)
        _upload_tensorboard(writer, loop_config.get("tensorboard_upload"))
    _report(task, config, stage, step, history, metrics, rank, position, final=True)
    if writer is not None:
        writer.close()


def _log_progress(writer, task: Task, stage: str, step: int, steps: int, window: StepWindow) -> None:
    """TensorBoard scalars (the window's mean logs, learning rate, throughput, data wait) and a progress line."""
    images_per_second = window.images_per_second()
    means = window.means()
    for key, value in means.items():
        writer.add_scalar(f"{stage}/{key}", value, step)
    lr = next(iter(task.optimizers.values())).param_groups[0]["lr"]
    writer.add_scalar(f"{stage}/lr", lr, step)
    writer.add_scalar(f"{stage}/images_per_second", images_per_second, step)
    writer.add_scalar(f"{stage}/data_wait_fraction", window.wait_fraction(), step)
    extra = "".join(f"{key.split('/')[-1]} {means[key]:.4f}  " for key in task.progress_keys if key in means)
    print(
        f"[{stage}] step {step}/{steps}  loss {means.get('loss/total', float('nan')):.4f}  {extra}"
        f"{images_per_second:.0f} img/s  data wait {100 * window.wait_fraction():.1f}%",
        flush=True,
    )


def _run_probe(probe: SampleProbe, task, writer, stage: str, step: int) -> dict[str, float]:
    scores = probe(task)
    for key, value in scores.items():
        writer.add_scalar(f"{stage}/{key}", value, step)
    print(f"[{stage}] step {step}  probe: {probe.num_samples} samples, Fréchet distance {scores['probe/fd']:.3f} "
          f"({probe.space} features, {scores['probe/seconds']:.1f}s)", flush=True)
    return scores


def _upload_tensorboard(writer, target: str | None) -> None:
    """Remote storage: copy rank 0's event files to `target` (the run folder's tensorboard/<stage>)."""
    if writer is None or not target:
        return
    import pyarrow.fs as pafs

    writer.flush()
    filesystem, path = pafs.FileSystem.from_uri(target)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(writer.log_dir, path, destination_filesystem=filesystem)


def _report(task, config, stage, step, history, metrics, rank, position, final=False) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches a checkpoint."""
    metrics = dict(metrics, final=final)
    if rank != 0:
        ray.train.report({"step": step, "final": final})
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(folder, task, config, stage, step, history, data_position=position)
        # The full metrics (nested: parameter counts, attempt history) travel inside the checkpoint;
        # Ray gets the flat scalars.
        Path(folder, "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(folder))
