"""`raydae sweep FILE`: Ray Tune over any config fields, each trial a whole raydae run.

A trial is a function that runs the stage chain (`pipeline.run_pipeline`), each stage a `TorchTrainer`
whose reports reach Tune through `StageReportCallback`, so ASHA can stop a poor trial while its
generator trains. The trial's run folder is named after its parameters (`<experiment>/runs/<name>`),
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

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
import typing
from typing import Any

import yaml

from raydae.config import Config, apply_override, coerce, load_config
from raydae.errors import UserError

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha")
RUNS_FOLDER = "runs"
# ASHA compares trials at equal generator steps (docs/architecture.md, "Sweeps prune on samples"). The
# signal is the sample probe's Fréchet distance; the generator's training loss is kept only under a name
# that says it does not compare latents of different shapes.
ASHA_TIME = "generator_step"
SIGNALS = {"sample_fd": "probe_fd", "train_loss_not_comparable": "generator_loss"}


@dataclass
class Resources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # fractional: several small trials share one GPU


@dataclass
class Scheduler:
    type: str = "fifo"  # fifo | asha
    grace_period: int = 1  # ASHA: generator steps before a trial may be stopped
    reduction_factor: int = 2
    # ASHA's signal: sample_fd (the sample probe, comparable across latents) | train_loss_not_comparable
    signal: str = "sample_fd"

    @property
    def metric(self) -> str:
        return SIGNALS[self.signal]


@dataclass
class SweepSpec:
    name: str
    base: dict = field(default_factory=dict)  # preset, config (files), set (dotted overrides)
    search: dict = field(default_factory=dict)  # dotted config field -> {grid|choice|uniform|loguniform|randint: ...}
    metric: str = ""  # a key of eval.samples (e.g. fd_shapesclf) or a dotted path in metrics.json; "" = headline
    mode: str = "min"
    scheduler: Scheduler = field(default_factory=Scheduler)
    num_samples: int = 1  # Tune's num_samples: repeats of the grid, draws of the random domains
    max_concurrent: int = 2
    resources: Resources = field(default_factory=Resources)
    storage: str = "runs/sweeps"
    # A study (raydae/study.py): arms x paired seeds, compared with a baseline arm. Empty for a plain sweep.
    study: dict = field(default_factory=dict)

    def space(self) -> dict:
        """The search the trials span: a study's arms x seeds (each pair sharing train.seed), then `search`."""
        if not self.study:
            return self.search
        return {ARM_KEY: {"grid": list(self.study["arms"])}, SEED_KEY: {"grid": self.study["seeds"]}, **self.search}

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


# -------------------------------------------------------------------------------- reading the file
def load_sweep(path: str) -> SweepSpec:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such sweep file; see sweeps/ for examples")
    try:
        data = yaml.safe_load(open(path).read()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_sweep(data, path)


def parse_sweep(data: dict, where: str = "sweep") -> SweepSpec:
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not data.get("name") or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(data["name"])):
        raise UserError(f"{where}: give `name:` (letters, digits, _ . -), it names the experiment folder")
    spec = SweepSpec(name=str(data["name"]))
    for key in ("base", "search"):
        if not isinstance(data.get(key, {}), dict):
            raise UserError(f"{where}: `{key}:` must be a mapping")
    spec.base = dict(data.get("base") or {})
    unknown = sorted(set(spec.base) - {"preset", "config", "set"})
    if unknown:
        raise UserError(f"{where}: base: unknown key(s) {', '.join(unknown)}; use preset, config, set")
    spec.search = dict(data.get("search") or {})
    for key in ("metric", "mode", "storage"):
        if key in data:
            setattr(spec, key, str(data[key]))
    for key in ("num_samples", "max_concurrent"):
        if key in data:
            setattr(spec, key, int(data[key]))
    if data.get("study"):  # to_dict() writes `study: {}` for a plain sweep
        spec.study = _parse_study(data["study"], f"{where}: study")
        if SEED_KEY in spec.search or ARM_KEY in spec.search:
            raise UserError(f"{where}: search: {SEED_KEY} and {ARM_KEY} are set by the study section; remove them")
    spec.scheduler = _section(Scheduler, data.get("scheduler"), f"{where}: scheduler")
    spec.resources = _section(Resources, data.get("resources"), f"{where}: resources")
    validate_sweep(spec, where)
    return spec


ARM_KEY = "study.arm"  # a study's search key naming the arm; it is no config field
SEED_KEY = "train.seed"  # the pairing of a study: every arm runs every seed


def _parse_study(data, where: str) -> dict:
    from raydae.study import DEFAULT_METRICS

    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping with arms, seeds, baseline")
    unknown = sorted(set(data) - {"arms", "seeds", "baseline", "metrics"})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: arms, seeds, baseline, metrics")
    arms = data.get("arms")
    if not isinstance(arms, dict) or len(arms) < 2:
        raise UserError(f"{where}: arms: give at least two named arms, e.g. joint: {{set: {{train.mode: joint}}}}")
    clean = {}
    for name, arm in arms.items():
        arm = arm or {}
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or not isinstance(arm, dict) \
                or set(arm) - {"label", "set"}:
            raise UserError(f"{where}: arms.{name}: an arm is a name (letters, digits, _ . -) with `label:` and "
                            "`set:` (dotted config overrides)")
        clean[str(name)] = {"label": str(arm.get("label", name)), "set": dict(arm.get("set") or {})}
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or len(seeds) < 2 or not all(isinstance(x, int) for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: give a list of at least two distinct integers (STUDY.md asks for >= 4)")
    baseline = str(data.get("baseline", ""))
    if baseline not in clean:
        raise UserError(f"{where}: baseline: {baseline!r} is not one of the arms ({', '.join(clean)})")
    metrics = data.get("metrics") or list(DEFAULT_METRICS)
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{where}: metrics: give a list of dotted paths in metrics.json")
    return {"arms": clean, "seeds": seeds, "baseline": baseline, "metrics": metrics}


def _section(cls, data, where: str):
    data = data or {}
    if isinstance(data, str):
        data = {"type": data}
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
    out = cls()
    hints = typing.get_type_hints(cls)
    for key, value in data.items():  # the config tree's own checks: "false" is no boolean, 1.5 no integer
        setattr(out, key, coerce(value, hints[key], f"{where}.{key}"))
    return out


def validate_sweep(spec: SweepSpec, where: str) -> None:
    if spec.mode not in ("min", "max"):
        raise UserError(f"{where}: mode: {spec.mode!r} is not min or max")
    if spec.scheduler.type not in SCHEDULERS:
        raise UserError(f"{where}: scheduler.type: {spec.scheduler.type!r} is not one of {', '.join(SCHEDULERS)}")
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        raise UserError(f"{where}: num_samples and max_concurrent must be at least 1")
    if not spec.space():
        raise UserError(f"{where}: `search:` is empty; give at least one config field to vary")
    base = base_config(spec)
    for path, domain in spec.space().items():
        if path == ARM_KEY and spec.study:
            continue
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise UserError(f"{where}: search.{path}: give exactly one of {', '.join(DOMAINS)}, "
                            f"e.g. {{grid: [0.25, 0.5]}}")
        kind, values = next(iter(domain.items()))
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}: search.{path}.{kind}: give a non-empty list of values")
            examples = values
        else:
            if not isinstance(values, list) or len(values) != 2 or not values[0] < values[1]:
                raise UserError(f"{where}: search.{path}.{kind}: give [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise UserError(f"{where}: search.{path}.loguniform: the bounds must be positive")
            examples = values
        for value in examples:  # each value must fit the field: caught here, not in a trial
            trial = copy.deepcopy(base)
            apply_override(trial, f"{path}={_format(value)}")
    if spec.study:
        _validate_study(spec, base, where)
    if spec.scheduler.signal not in SIGNALS:
        raise UserError(f"{where}: scheduler.signal: {spec.scheduler.signal!r} is not one of {', '.join(SIGNALS)}")
    if spec.scheduler.type == "asha" and base.generator == "none":
        raise UserError(f"{where}: scheduler asha compares trials on the generator's samples, but the base config "
                        "trains no generator; set base.set.generator or use scheduler: fifo")
    if spec.scheduler.type == "asha" and spec.scheduler.signal == "sample_fd" \
            and base.generator_train.probe_samples <= 0:
        raise UserError(f"{where}: scheduler asha prunes on the sample probe, but base generator_train.probe_samples "
                        "is 0; set it (e.g. 256) or scheduler.signal: train_loss_not_comparable")


def _validate_study(spec: SweepSpec, base: Config, where: str) -> None:
    """A study compares arms fairly: no early stopping, random draws or generator/evaluation differences."""
    if spec.scheduler.type != "fifo":
        raise UserError(f"{where}: a study runs every arm to the end; use scheduler: fifo (ASHA would stop arms "
                        "on their training loss and bias the comparison)")
    for path, domain in spec.search.items():
        if path != ARM_KEY and next(iter(domain)) != "grid":
            raise UserError(f"{where}: search.{path}: a study's extra axes must be grids, so every arm sees the "
                            "same values")
    configs = {name: arm_config(spec, name) for name in spec.study["arms"]}
    # Same yardstick and budget for every arm: only the autoencoder and its schedule may differ.
    for section in ("generator", "generator_train", "dit", "prior", "eval", "data"):
        if not hasattr(base, section):
            continue
        values = {name: json.dumps(getattr(c, section) if isinstance(getattr(c, section), str)
                                   else getattr(c, section).__dict__, sort_keys=True, default=str)
                  for name, c in configs.items()}
        if len(set(values.values())) > 1:
            raise UserError(f"{where}: arms differ in `{section}`; a study keeps the generator, its budget, the data "
                            "and the evaluation the same for every arm (put such changes in base.set)")


def arm_config(spec: SweepSpec, arm: str) -> Config:
    config = base_config(spec)
    for path, value in spec.study["arms"][arm]["set"].items():
        apply_override(config, f"{path}={_format(value)}")
    return config


def _format(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def base_config(spec: SweepSpec) -> Config:
    base = spec.base
    files = base.get("config") or []
    overrides = [f"{key}={_format(value)}" for key, value in (base.get("set") or {}).items()]
    config = load_config(base.get("preset"), [files] if isinstance(files, str) else list(files), overrides)
    r = spec.resources
    for key, value in (("num_workers", r.num_workers), ("cpus_per_worker", r.cpus_per_worker),
                       ("use_gpu", r.use_gpu), ("gpus_per_worker", r.gpus_per_worker)):
        setattr(config.scaling, key, value)
    return config


def trial_config(spec: SweepSpec, params: dict) -> Config:
    config = arm_config(spec, params[ARM_KEY]) if ARM_KEY in params else base_config(spec)
    for path, value in sorted(params.items()):
        if path == ARM_KEY:
            continue
        apply_override(config, f"{path}={_format(value)}")
    from raydae.config import validate

    validate(config)
    return config


def trial_name(params: dict) -> str:
    """Readable and deterministic: the same parameters always name the same run folder."""
    parts = []
    for path, value in sorted(params.items()):
        short = ".".join(path.split(".")[-2:]) if path.split(".")[-2:-1] != ["ae"] else path.split(".")[-1]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}={text}")
    readable = re.sub(r"[^A-Za-z0-9_.=,-]+", "", ",".join(parts))[:80]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


# ---------------------------------------------------------------------------------- inside a trial
def metric_value(metrics: dict, metric: str):
    """`fd_shapesclf` looks in eval.samples; a dotted path (`generator.diffusion_loss`) anywhere."""
    if "." not in metric:
        return metrics.get("eval", {}).get("samples", {}).get(metric)
    node: Any = metrics
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, (int, float)) else None


def run_trial(params: dict, spec_dict: dict, experiment: str) -> None:
    """One trial: the whole run chain in `<experiment>/runs/<trial name>`, then one final Tune report."""
    from ray import tune

    from raydae.pipeline import DONE_MARKER, RunOptions, run_pipeline
    from raydae.storage import RunFolder

    spec = parse_sweep(spec_dict)
    config = trial_config(spec, params)
    name = trial_name(params)
    storage = f"{experiment}/{RUNS_FOLDER}"
    finished = RunFolder(storage, name).exists(DONE_MARKER)
    options = RunOptions(storage=storage, name=name, resume=finished, report_to_tune=True)
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


# ----------------------------------------------------------------------------------------- driver
def scheduler_metrics(stage: str, report: dict) -> dict:
    """What a stage's report adds for the sweep's scheduler: generator step and both signals."""
    if stage != "generator" or "loss/total" not in report:
        return {}
    out = {ASHA_TIME: report.get("step", 0), SIGNALS["train_loss_not_comparable"]: report["loss/total"]}
    if "probe/fd" in report:
        out[SIGNALS["sample_fd"]] = report["probe/fd"]
    return out


def make_asha(scheduler: Scheduler, max_t: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=ASHA_TIME, metric=scheduler.metric, mode="min", max_t=max_t,
                         grace_period=scheduler.grace_period, reduction_factor=scheduler.reduction_factor)


def _check_inception_metric(spec: SweepSpec) -> None:
    """An Inception metric as the target needs the weights: say so before any trial trains."""
    from raydae.eval.inception import resolve_inception_weights

    wanted = [spec.metric, *spec.study.get("metrics", [])]
    if any(m.split(".")[-1] in ("fid", "rfid", "kid", "is") or m.endswith("_inception") for m in wanted):
        ev = base_config(spec).eval
        if resolve_inception_weights(ev.inception_weights, ev.inception_sha256) is None:
            raise UserError(f"sweep metric {', '.join(wanted)} needs the Inception weights: set base.set."
                            "eval.inception_weights to a local weights-inception-2015-12-05-6726825d.pth, "
                            "or target fd_randfeat (random-network features) instead")


def _search_space(spec: SweepSpec) -> dict:
    from ray import tune

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
    from ray import tune

    from raydae import launch
    from raydae.storage import RunFolder
    from raydae.tune_callback import ReclaimLeakedPlacementGroups

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
        if saved != spec.to_dict():
            raise UserError(f"sweep {experiment} was started from a different sweep file; run it with the same "
                            "file, or change `name:` to start a new sweep")
    _check_inception_metric(spec)
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
    def decoder(d) -> str:
        return f"w{d.width:g} b{d.num_res_blocks} d{d.dropout:g}"

    train = config.train
    if train.mode == "dae":
        return {"mode": "dae", "total_ae_steps": train.stage1_steps + train.stage2_steps,
                "final_decoder_steps": train.stage2_steps, "final_decoder": decoder(config.ae.decoder),
                "aux_decoder": decoder(config.ae.aux_decoder)}
    steps = config.stage_steps("joint")
    return {"mode": "joint", "total_ae_steps": steps, "final_decoder_steps": steps,
            "final_decoder": decoder(config.ae.decoder), "aux_decoder": "-"}


def _write_study_figure(root, blocks: list[dict], metrics: list[str]) -> bool:
    import io

    import matplotlib.pyplot as plt

    from raydae.report import study_figure

    figure = study_figure(blocks, metrics)
    if figure is None:
        return False
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    root.write_bytes("study.png", buffer.getvalue())
    return True


def summarise_study(spec: SweepSpec, root, trials: list[dict]) -> dict:
    """study.json and study.md: per arm and metric, mean and seed spread, and paired differences."""
    from raydae.storage import RunFolder
    from raydae.study import compare, markdown

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
    blocks = compare(runs, arms, study["baseline"], study["metrics"])
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
