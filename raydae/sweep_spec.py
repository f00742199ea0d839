"""The sweep file: its spec, parsing and checks, trial names and configs, ASHA's signals.

Everything about a sweep that needs no Ray: `sweep.py` (the Tune driver), `tune_callback.py` (inside a
trial) and the tests read sweep files through this module, so a bad file fails before Ray starts. A study
is a sweep file with a `study:` section; its statistics are `study.py`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from raydae.config import Config, apply_override, coerce, load_config, validate
from raydae.errors import UserError
from raydae.eval.inception import resolve_inception_weights
from raydae.study import DEFAULT_METRICS

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha")
RUNS_FOLDER = "runs"
# ASHA compares trials at equal generator steps on the sample probe; why: docs/architecture.md,
# "Sweeps prune on samples".
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
        return dataclasses.asdict(self)


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
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping with arms, seeds, baseline")
    unknown = sorted(set(data) - {"arms", "seeds", "baseline", "metrics", "pairs"})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: arms, seeds, baseline, metrics, pairs")
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
        raise UserError(f"{where}: seeds: give a list of at least two distinct integers; use 4 or more")
    baseline = str(data.get("baseline", ""))
    if baseline not in clean:
        raise UserError(f"{where}: baseline: {baseline!r} is not one of the arms ({', '.join(clean)})")
    metrics = data.get("metrics") or list(DEFAULT_METRICS)
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{where}: metrics: give a list of dotted paths in metrics.json")
    study = {"arms": clean, "seeds": seeds, "baseline": baseline, "metrics": metrics}
    pairs = _parse_pairs(data.get("pairs") or [], clean, where)
    if pairs:  # absent when none, so a study saved before `pairs:` existed still resumes as the same file
        study["pairs"] = pairs
    return study


def _parse_pairs(pairs, arms: dict, where: str) -> list[list[str]]:
    """`pairs: [[arm, reference], ...]`: comparisons besides every arm against the baseline (e.g. DAE against
    joint training with the same small decoder, when the baseline is joint training with the full one)."""
    example = f"e.g. pairs: [[{', '.join(list(arms)[-2:][::-1])}]]"
    if not isinstance(pairs, list):
        raise UserError(f"{where}: pairs: give a list of [arm, reference] pairs, {example}")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(str(a) in arms for a in pair)
                and pair[0] != pair[1]):
            raise UserError(f"{where}: pairs: {pair!r} is not two different arms of this study "
                            f"({', '.join(arms)}); {example}")
    return [[str(a), str(b)] for a, b in pairs]


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
    if spec.num_samples != 1:
        raise UserError(f"{where}: num_samples is {spec.num_samples}; a study repeats its arms over study.seeds, "
                        "one run per arm and seed (remove num_samples, or add seeds)")
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


def scheduler_metrics(stage: str, report: dict) -> dict:
    """What a stage's report adds for the sweep's scheduler: generator step and both signals."""
    if stage != "generator" or "loss/total" not in report:
        return {}
    out = {ASHA_TIME: report.get("step", 0), SIGNALS["train_loss_not_comparable"]: report["loss/total"]}
    if "probe/fd" in report:
        out[SIGNALS["sample_fd"]] = report["probe/fd"]
    return out


def check_inception_metric(spec: SweepSpec) -> None:
    """An Inception metric as the target needs the weights: say so before any trial trains."""
    wanted = [spec.metric, *spec.study.get("metrics", [])]
    if any(m.split(".")[-1] in ("fid", "rfid", "kid", "is") or m.endswith("_inception") for m in wanted):
        ev = base_config(spec).eval
        if resolve_inception_weights(ev.inception_weights, ev.inception_sha256) is None:
            raise UserError(f"sweep metric {', '.join(wanted)} needs the Inception weights: set base.set."
                            "eval.inception_weights to a local weights-inception-2015-12-05-6726825d.pth, "
                            "or target fd_randfeat (random-network features) instead")
