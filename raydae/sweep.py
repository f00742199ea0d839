"""The Tune driver of `raydae sweep FILE`: Ray Tune over any config fields, each trial a whole raydae run.

A trial is a function that runs the stage chain (`pipeline.run_pipeline`), each stage a `TorchTrainer`
whose reports reach Tune through `StageReportCallback` (handed over as `RunOptions.stage_callbacks`), so
ASHA can stop a poor trial while its generator trains. Reading and checking the sweep file is
`sweep_spec.py`'s. The trial's run folder is named after its parameters (`<experiment>/runs/<name>`),
so a retried or restored trial continues its own checkpoints and a finished one returns its stored
metrics instead of training again (Tune may rerun a trial that finished just before the driver died).

Layout of `<storage>/<sweep name>/`:
    sweep.yaml            the sweep file as it was run
    runs/<trial>/         raydae run folders (config.yaml, checkpoints, tensorboard/, metrics.json)
    <Tune trial dirs>     Tune's own state, result.json and TensorBoard events
    results.csv           every trial: parameters, status and metrics
    best_config.yaml      the best trial's full config: `raydae run --config best_config.yaml`
    report.md, report/    `raydae report` on the sweep
`tensorboard --logdir <storage>/<sweep name>` shows Tune's and every trial's TensorBoard together.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import matplotlib.pyplot as plt
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raydae import launch
from raydae.config import Config
from raydae.errors import UserError
from raydae.metrics_json import metric_value
from raydae.pipeline import DONE_MARKER, RunOptions, run_pipeline
from raydae.report import decoder_label, study_figure
from raydae.storage import RunFolder
from raydae.study import compare, markdown
from raydae.sweep_spec import (
    ARM_KEY,
    ASHA_TIME,
    RUNS_FOLDER,
    SEED_KEY,
    SIGNALS,
    Scheduler,
    SweepSpec,
    arm_config,
    base_config,
    check_inception_metric,
    load_sweep,
    parse_sweep,
    trial_config,
    trial_name,
)
from raydae.tune_callback import ReclaimLeakedPlacementGroups, StageReportCallback

# ---------------------------------------------------------------------------------- inside a trial
def run_trial(params: dict, spec_dict: dict, experiment: str) -> None:
    """One trial: the whole run chain in `<experiment>/runs/<trial name>`, then one final Tune report."""
    spec = parse_sweep(spec_dict)
    config = trial_config(spec, params)
    name = trial_name(params)
    storage = f"{experiment}/{RUNS_FOLDER}"
    finished = RunFolder(storage, name).exists(DONE_MARKER)
    options = RunOptions(storage=storage, name=name, resume=finished, stage_callbacks=report_to_tune)
    metrics = run_pipeline(config, options)  # a finished run returns its stored metrics at once
    metric = spec.metric or metrics.get("eval", {}).get("headline", "")
    result = {"run": name, "metric_name": metric}
    value = metric_value(metrics, metric) if metric else None
    if value is not None:
        result[metric] = value
    for key, number in (metrics.get("eval", {}).get("samples") or {}).items():
        if isinstance(number, (int, float)):
            result[f"eval/{key}"] = number
    if config.generator != "none":
        result[ASHA_TIME] = config.generator_train.steps
        generator = metrics.get("generator", {})
        if "probe_fd" in generator:  # the probe at the last step: the finished trial's row shows it too
            result[SIGNALS["sample_fd"]] = generator["probe_fd"]
    tune.report(result)


def report_to_tune(stage: str) -> list:
    """A trial's stages forward every report to Tune, so its scheduler can stop the trial."""
    return [StageReportCallback(stage)]


# ----------------------------------------------------------------------------------------- driver
def make_asha(scheduler: Scheduler, max_t: int):
    return ASHAScheduler(time_attr=ASHA_TIME, metric=scheduler.metric, mode="min", max_t=max_t,
                         grace_period=scheduler.grace_period, reduction_factor=scheduler.reduction_factor)


def _search_space(spec: SweepSpec) -> dict:
    space = {}
    for path, domain in spec.space().items():
        kind, values = next(iter(domain.items()))
        space[path] = {
            "grid": lambda v: tune.grid_search(v),
            "choice": lambda v: tune.choice(v),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),  # [low, high): Tune's convention
        }[kind](values)
    return space


def run_sweep(path: str, resume: bool = False, address: str | None = None, storage: str | None = None) -> dict:
    """Run (or restore) the sweep in `path`; returns the summary written to results.csv / best_config.yaml."""
    spec = load_sweep(path)
    if storage:
        spec.storage = storage
    root = RunFolder(spec.storage, spec.name)
    experiment = root.uri
    exists = root.exists("sweep.yaml")
    if resume and not exists:
        raise UserError(f"--resume: no sweep at {experiment}; drop --resume to start it")
    if exists:
        saved = yaml.safe_load(root.read_text("sweep.yaml"))
        if _what_trials_run(saved) != _what_trials_run(spec.to_dict()):
            raise UserError(f"sweep {experiment} was started from a different sweep file; run it with the same "
                            "file, or change `name:` to start a new sweep")
    check_inception_metric(spec)
    # Trials run Train workers of their own; the embedded Ray needs room for every concurrent trial's
    # workers plus one CPU per trial for its Ray Data pipeline, or input pipelines wait forever.
    per_trial = spec.resources.num_workers * spec.resources.cpus_per_worker + 1
    probe = base_config(spec)
    probe.scaling.num_workers = max(1, math.ceil(per_trial * spec.max_concurrent) - 1)
    probe.scaling.cpus_per_worker = 1
    launch.connect(address, probe)
    launch.check_storage_is_shared(spec.storage)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # stage reports before the generator lack ASHA's metric
    root.make()
    root.write_text("sweep.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))

    trainable = tune.with_parameters(run_trial, spec_dict=spec.to_dict(), experiment=experiment)
    # The trial itself only waits on its TorchTrainers, whose workers ask for their own resources.
    trainable = tune.with_resources(trainable, {"cpu": 0.01})
    if exists and tune.Tuner.can_restore(experiment):
        print(f"restoring sweep {experiment}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler.type == "asha":
            scheduler = make_asha(spec.scheduler, max_t=probe.generator_train.steps)
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(spec),
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage if "://" in spec.storage
                                      else os.path.abspath(os.path.expanduser(spec.storage)),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[ReclaimLeakedPlacementGroups()]),
        )
    grid = tuner.fit()
    summary = summarise_sweep(spec, root, grid)
    if spec.study:
        summary["study"] = summarise_study(spec, root, summary["trials"])
    return summary


def summarise_sweep(spec: SweepSpec, root, grid) -> dict:
    """results.csv (every trial) and best_config.yaml (the best finished trial's full config)."""
    rows = []
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items()}
        metrics = result.metrics or {}
        name = trial_name(params)
        metric = spec.metric or metrics.get("metric_name", "")
        value = metrics.get(metric) if metric else None
        if result.error is not None:
            status = "error"
        elif metric and value is not None:
            status = "finished"
        else:
            status = "stopped"  # by the scheduler, before the run finished
        rows.append({"trial": name, "status": status, **params, "metric": metric, "value": value,
                     **{key: metrics.get(key) for key in SIGNALS.values()}, ASHA_TIME: metrics.get(ASHA_TIME)})
    finished = [row for row in rows if row["status"] == "finished"]
    sign = 1 if spec.mode == "min" else -1
    finished.sort(key=lambda row: sign * row["value"])
    order = finished + [row for row in rows if row["status"] != "finished"]
    columns = ["trial", "status", *spec.space(), "metric", "value", *SIGNALS.values(), ASHA_TIME]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(order)
    root.write_text("results.csv", buffer.getvalue())
    summary = {"experiment": root.uri, "trials": order, "best": None, "mode": spec.mode}
    if finished:
        best = finished[0]
        config = trial_config(spec, {key: best[key] for key in spec.space()})
        header = (f"# Best trial of sweep {spec.name}: {best['trial']} ({best['metric']} = {best['value']:.6g}, "
                  f"mode {spec.mode}).\n# Run it: raydae run --config best_config.yaml\n")
        root.write_text("best_config.yaml", header + config.to_yaml())
        summary["best"] = best
    return summary


def arm_schedule(config: Config) -> dict:
    """What a study's table says about an arm's autoencoder: its step budget and its decoders."""
    train = config.train
    decoder = decoder_label(dataclasses.asdict(config.ae.decoder))
    if train.mode == "dae":
        return {"mode": "dae", "total_ae_steps": train.stage1_steps + train.stage2_steps,
                "final_decoder_steps": train.stage2_steps, "final_decoder": decoder,
                "aux_decoder": decoder_label(dataclasses.asdict(config.ae.aux_decoder))}
    steps = config.stage_steps("joint")
    return {"mode": "joint", "total_ae_steps": steps, "final_decoder_steps": steps,
            "final_decoder": decoder, "aux_decoder": "-"}


def _write_study_figure(root, blocks: list[dict], metrics: list[str]) -> bool:
    figure = study_figure(blocks, metrics)
    if figure is None:
        return False
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    root.write_bytes("study.png", buffer.getvalue())
    return True


def _what_trials_run(spec: dict) -> dict:
    """A sweep file without what only shapes a study's tables (its metrics, pairs and arm labels): editing those
    and running the same command again redraws study.md from the finished runs."""
    study = spec.get("study")
    if not study:
        return spec
    arms = {name: {k: v for k, v in arm.items() if k != "label"} for name, arm in study.get("arms", {}).items()}
    return {**spec, "study": {**{k: v for k, v in study.items() if k not in ("metrics", "pairs")}, "arms": arms}}


def summarise_study(spec: SweepSpec, root, trials: list[dict]) -> dict:
    """study.json and study.md: per arm and metric, mean and seed spread, and paired differences."""
    study = spec.study
    others = [path for path in spec.search]
    runs = []
    for row in trials:
        folder = RunFolder(f"{root.uri}/{RUNS_FOLDER}", row["trial"])
        if row["status"] != "finished" or not folder.exists("metrics.json"):
            continue
        group = ", ".join(f"{path}={row[path]}" for path in others)
        runs.append({"arm": row[ARM_KEY], "seed": int(row[SEED_KEY]), "group": group,
                     "metrics": folder.read_json("metrics.json")})
    arms = list(study["arms"])
    blocks = compare(runs, arms, study["baseline"], study["metrics"], study.get("pairs", []))
    schedules = {arm: arm_schedule(arm_config(spec, arm)) for arm in arms}
    labels = {arm: study["arms"][arm]["label"] for arm in arms}
    missing = len(arms) * len(study["seeds"]) * max(1, math.prod(len(d["grid"]) for d in spec.search.values())) \
        - len(runs)
    header = (f"# Study {spec.name}\n\n{len(runs)} finished runs"
              + (f" ({missing} not finished: see results.csv)" if missing else "")
              + f"; seeds {', '.join(map(str, study['seeds']))}; baseline arm `{study['baseline']}`.\n\n")
    text = header + markdown(blocks, labels, study["baseline"], study["metrics"], schedules)
    if _write_study_figure(root, blocks, study["metrics"]):
        text += "\n![per-seed values of every metric, paired across arms](study.png)\n"
    root.write_text("study.md", text)
    result = {"baseline": study["baseline"], "schedules": schedules, "labels": labels, "groups": blocks}
    root.write_text("study.json", json.dumps(result, indent=2, default=str))
    return {**result, "markdown": text}
