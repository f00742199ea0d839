"""Driver side of Ray Train: connect to Ray, check resources, and run one stage as a `TorchTrainer`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time

import ray
import ray._private.services as ray_services
import ray._private.worker as ray_worker
import ray.train
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydae.config import Config
from raydae.errors import UserError
from raydae.loop import train_worker
from raydae.ray_env import QUIET_RAY_ENV
from raydae.storage import RunFolder

# Ray Train's own INFO lines (worker group started, the three-paragraph "run snapshot was found" notice on every
# resume) say what raydae's own lines already say ("[stage1] resuming from step N"); its warnings still show.
TRAIN_LOG_LEVEL = "WARNING"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node

# Lines Ray's own actors print that are harmless and that a user cannot act on, dropped from the console
# (the log files under the Ray session folder keep them):
# - Ray Train's placement-group cleaner (a detached actor per fit) polls the State API; where that fails (no
#   dashboard; before start_local_ray, a dead cluster's address) it prints a 30-line traceback, while the
#   group is released anyway.
# - Ray Data warns "Progress bars disabled" once per process because raydae disables them on purpose.
# - Ray Train's INFO line for a checkpoint report still reaches the console from the worker once Ray Data
#   has configured its logging there, despite the WARNING level asked of Train.
# - The Train controller logs "Failed to stop PlacementGroupCleaner gracefully." with a traceback when that
#   cleaner is still inside its timed-out poll; the cleaner exits on its own once the controller is gone.
#   Without a dashboard (the test session's Ray) the cleaner cannot see the controller, exits at once, and the
#   controller says "Failed to register placement group with cleaner" with the dead actor's details.
HARMLESS_ACTORS = ("PlacementGroupCleaner",)
HARMLESS_LINE_STARTS = ("Progress bars disabled.", "Reporting training result ")
HARMLESS_TRACEBACK_STARTS = ("Failed to stop PlacementGroupCleaner gracefully.",
                            "Failed to register placement group with cleaner",
                            # a finished Tune trial's actor stopped by SIGTERM while Python ran a WeakSet
                            # callback: Ray's handler raises SystemExit inside it
                            "Exception ignored in: <function WeakSet.__init__.<locals>._remove")


def connect(address: str | None = None, config: Config | None = None) -> bool:
    """Connect to the cluster at `address`/RAY_ADDRESS, or start an embedded local Ray.

    Returns True when Ray was started here (a local, fixed-size "cluster" with no autoscaler).
    """
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **_workers_know_their_cluster(address))
        _drop_harmless_worker_lines()
        return False
    # The Train workers hold their CPUs for the whole fit; Ray Data's map tasks need at least one more,
    # or the input pipeline waits forever. On a small machine, advertise that one extra logical CPU.
    num_cpus = os.cpu_count() or 1
    if config is not None:
        needed = math.ceil(config.scaling.num_workers * config.scaling.cpus_per_worker) + 1
        num_cpus = max(num_cpus, needed)
    # The dashboard is on: users watch runs there, and without it Ray Train's placement-group cleaner
    # logs "State API may be temporarily unavailable" every few seconds.
    # address="local": always a new embedded Ray, even where a crashed one left /tmp/ray/ray_current_cluster.
    start_local_ray(num_cpus, include_dashboard=True)
    _drop_harmless_worker_lines()
    return True


def start_local_ray(num_cpus: int, include_dashboard: bool) -> None:
    """Start an embedded local Ray whose workers know its address.

    `ray.init(address="local")` leaves workers to find their cluster in /tmp/ray/ray_current_cluster, which
    names whichever cluster `ray start` wrote last. Ray Train's placement-group cleaner (a State API call in a
    worker) looks there: a dead cluster's address made it poll for 40 s, every fit's shutdown wait 12 s for it
    and print a traceback; a live other cluster's address would make it think the controller dead and remove
    a running fit's placement group. So the GCS port is chosen here and given to the job's workers as
    RAY_ADDRESS, without touching that file.
    """
    with socket.socket() as probe:  # a free port now; Ray binds it a moment later
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{ray_services.get_node_ip_address()}:{port}"
    previous = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(port)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=True,
                 runtime_env=_runtime_env_naming(address))
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = previous


def _workers_know_their_cluster(address: str) -> dict:
    """`ray.init` arguments that give this job's workers RAY_ADDRESS (why: start_local_ray). Not for Ray Client,
    nor inside a Ray Job, whose runtime env is the job's and whose cluster `ray start` recorded."""
    if address.startswith("ray://") or RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return {}
    try:
        resolved = ray_services.canonicalize_bootstrap_address_or_die(address)
    except Exception:  # ray.init says what is wrong with the address, in Ray's words
        return {}
    return {"runtime_env": _runtime_env_naming(resolved)}


def _runtime_env_naming(address: str) -> dict:
    """A job runtime env whose workers find their cluster at `address`, not in /tmp/ray/ray_current_cluster."""
    return {"env_vars": {"RAY_ADDRESS": address}}


class HarmlessLineFilter:
    """Removes Ray's own harmless lines from batches of worker output (as Ray's log monitor sends them to the
    driver); a harmless message's traceback may arrive in later batches, so it keeps state per output stream."""

    def __init__(self):
        # Output streams (pid, stderr?) inside a harmless message: "opened" right after its first line (a
        # one-line message ends at the next unindented line, which is kept), "traceback" once it goes on.
        self._open: dict = {}

    def __call__(self, batch: dict) -> dict | None:
        """The batch without harmless lines; None when nothing is left to print."""
        if batch.get("actor_name") in HARMLESS_ACTORS:
            return None
        stream = (batch.get("pid"), batch.get("is_err"))
        lines = batch.get("lines", [])
        kept = [line for line in lines if not self._harmless(stream, line)]
        if len(kept) == len(lines):
            return batch
        return {**batch, "lines": kept} if any(line.strip() for line in kept) else None

    def _harmless(self, stream, line: str) -> bool:
        text = line.lstrip()
        if text.startswith(HARMLESS_TRACEBACK_STARTS):
            self._open[stream] = "opened"
            return True
        state = self._open.get(stream)
        # What goes on a message: a traceback's header, indented frames and details, ^^^ markers, blank lines.
        goes_on = text.startswith("Traceback (most recent call last)") or line[:1].isspace() or not text
        if state == "opened" and not goes_on:
            del self._open[stream]  # a one-line message: this line is not part of it
        elif state is not None:
            if not goes_on:  # the exception's own line, the message's last
                del self._open[stream]
            else:
                self._open[stream] = "traceback"
            return True
        return text.startswith(HARMLESS_LINE_STARTS)


def _drop_harmless_worker_lines() -> None:
    """Put a filter in front of the handler that prints workers' lines on the driver (Ray's private hook:
    where it has moved, every line is printed as before)."""
    # A logger filter sees only records logged on that very logger, so name the one that warns.
    logging.getLogger("ray.data._internal.progress").addFilter(_not_harmless_record)
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(dispatcher, "handlers", None)
    if not isinstance(handlers, list):
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _filtered(handler) if name == "ray_print_logs" else handler)
                               for name, handler in handlers]


def _not_harmless_record(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(HARMLESS_LINE_STARTS)


def _filtered(handler):
    if getattr(handler, "drops_harmless_lines", False):
        return handler

    harmless_lines = HarmlessLineFilter()

    def print_unless_harmless(batch):
        batch = harmless_lines(batch)
        if batch is not None:
            handler(batch)

    print_unless_harmless.drops_harmless_lines = True
    return print_unless_harmless


def check_storage_is_shared(storage: str) -> None:
    """On a multi-node cluster, a storage *path* must be one folder every node sees (NFS, a shared mount).

    Checked before training: a path that exists only on the head would make workers write checkpoints
    where nobody finds them, and lose a run on the first node failure. URIs (s3://, gs://) are shared.
    """
    if "://" in storage:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) <= 1:
        return
    import uuid

    folder = os.path.abspath(os.path.expanduser(storage))
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f".raydae-storage-check-{uuid.uuid4().hex[:12]}")
    open(marker, "w").close()
    try:
        unseen = [node["NodeManagerAddress"] for node, seen in zip(nodes, _probe_nodes(nodes, marker)) if not seen]
    finally:
        os.remove(marker)
    if unseen:
        raise UserError(
            f"storage {folder} is not shared: {len(unseen)} of {len(nodes)} nodes ({', '.join(unseen[:3])}) cannot "
            "see it; give --storage a folder every node mounts (NFS) or a bucket (s3://BUCKET/PATH)"
        )


def _probe_nodes(nodes: list[dict], path: str) -> list[bool]:
    """Whether `path` exists, as seen from each node (a zero-CPU task pinned to it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    exists = ray.remote(num_cpus=0)(os.path.exists)
    return ray.get([
        exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(path)
        for node in nodes
    ])


def check_resources(config: Config, local: bool) -> None:
    """Fail early, in one line, when the run asks for GPUs the cluster does not have."""
    scaling = config.scaling
    if not scaling.use_gpu:
        return
    need = scaling.num_workers * scaling.gpus_per_worker
    have = ray.cluster_resources().get("GPU", 0)
    if have >= need:
        return
    if local:
        raise UserError(
            f"scaling.use_gpu=true asks for {need:g} GPUs but this machine's Ray has {have:g}; "
            "set scaling.use_gpu=false or run on a GPU machine/cluster"
        )
    # A connected cluster may autoscale GPU workers: wait a while before giving up.
    print(f"waiting up to {scaling.gpu_wait_s:.0f}s for GPU nodes (cluster has {have:g}, run needs {need:g})")
    deadline = time.time() + scaling.gpu_wait_s
    while time.time() < deadline:
        time.sleep(5)
        if ray.cluster_resources().get("GPU", 0) >= need:
            return
    raise UserError(
        f"scaling.use_gpu=true asks for {need:g} GPUs but the cluster has "
        f"{ray.cluster_resources().get('GPU', 0):g} after {scaling.gpu_wait_s:.0f}s; "
        "add GPU worker nodes, lower scaling.num_workers, or set scaling.use_gpu=false"
    )


def fit_stage(config: Config, stage: str, run: RunFolder, datasets: dict, init_from: str | None = None,
              latent_facts: dict | None = None, callbacks: list | None = None, probe: dict | None = None,
              val_latents: str | None = None) -> dict:
    """Run one stage to completion (resuming from its latest checkpoint if it has one).

    `datasets`: "train", and "val" unless `val_latents` (generator stage) names the stored held-out latents.
    `probe` (generator stage): the real-image reference rank 0 scores its fixed-noise samples against.

    Returns the stage's metrics (read back from the final checkpoint) and that checkpoint's path.
    """
    scaling = config.scaling
    settings = config.generator_train if stage == "generator" else config.train
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    # Local/NFS storage: rank 0 writes event files in place. Remote storage (s3://): rank 0 writes on its own
    # node and uploads them with each checkpoint and at the end (loop.py).
    tensorboard_dir = run.child("tensorboard", stage) if run.is_local else None
    tensorboard_upload = None if run.is_local else run.child("tensorboard", stage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "stage": stage,
            "steps": config.stage_steps(stage),
            "init_from": init_from,
            "tensorboard_dir": tensorboard_dir,
            "tensorboard_upload": tensorboard_upload,
            "latent_facts": latent_facts or {},
            "probe": probe,
            "val_latents": val_latents,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=run.uri,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, settings.keep_checkpoints)),
            # Inside a sweep's trial: callbacks that forward every report to Tune (sweep.report_to_tune).
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
        ),
        datasets=datasets,
        # Every worker sees the whole validation split; only rank 0 evaluates it. A lone worker needs no split:
        # its iterator runs the dataset itself, without a split-coordinator actor (~4 s of every fit here).
        dataset_config=DataConfig(datasets_to_split=["train"] if scaling.num_workers > 1 else [],
                                  execution_options=ingest_options()),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise UserError(f"{stage} failed: {_worker_error_line(err)} (run again with --debug for the traceback)") from err
    if result.checkpoint is None:
        raise UserError(f"{stage} ended without a final checkpoint; see the worker log above")
    with result.checkpoint.as_directory() as folder:
        metrics = json.loads(open(os.path.join(folder, "metrics.json")).read())
    path = result.checkpoint.path
    uri = path if run.is_local else f"{run.uri.split('://')[0]}://{path.lstrip('/')}"
    return {"metrics": metrics, "checkpoint": uri}


def ingest_options() -> ExecutionOptions:
    """Ray Train's default ingest options (from the current DataContext), built without `exclude_resources`.

    Train's own default passes `exclude_resources` along, which Ray Data 2.60 deprecates with a warning on
    every fit; it is zero unless set, so leaving it out changes nothing else."""
    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def _worker_error_line(err: Exception) -> str:
    """The last exception line of a worker traceback: the part a user can act on."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception)\b", line):
            return re.sub(r"^raydae\.errors\.UserError:\s*", "", line)
    return lines[-1] if lines else repr(err)
