"""Sweeps: the sweep file's checks (no Ray) and a tiny Ray Tune sweep with ASHA.

Interrupting a sweep's driver and resuming it is tested on the study (tests/test_study.py), which is a sweep.
"""

import csv
import os
import subprocess
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import yaml

from raydae.config import load_config
from raydae.errors import UserError
from raydae.metrics_json import metric_value
from raydae.sweep import make_asha
from raydae.sweep_spec import (SIGNALS, Scheduler, parse_sweep, scheduler_metrics, trial_config,
                               trial_name)

# Seconds-long trials: one tiny autoencoder stage and an 8-step DiT that reports every 2 steps (ASHA's rungs).
TINY_BASE = {
    "preset": "tiny",
    "set": {
        "train.mode": "joint", "train.joint_steps": 3, "train.checkpoint_every": 100,
        "generator": "dit", "dit.sample_steps": 2, "generator_train.steps": 8,
        "generator_train.batch_size": 16, "generator_train.checkpoint_every": 2, "generator_train.log_every": 2,
        "generator_train.warmup_steps": 0, "generator_train.probe_samples": 32, "generator_train.probe_sample_steps": 2,
    },
}


def _sweep(**overrides) -> dict:
    spec = {"name": "s", "base": TINY_BASE, "search": {"ae.aux_decoder.width": {"grid": [0.5, 1.0]}},
            "metric": "generator.diffusion_loss", "mode": "min"}
    spec.update(overrides)
    return spec


# ------------------------------------------------------------------------------------ no Ray
def test_sweep_file_mistakes_are_named():
    with pytest.raises(UserError, match="unknown key.*serach"):
        parse_sweep({**_sweep(), "serach": {}})
    with pytest.raises(UserError, match="exactly one of grid, choice"):
        parse_sweep(_sweep(search={"train.lr": {"between": [1, 2]}}))
    with pytest.raises(UserError, match=r"\[low, high\]"):
        parse_sweep(_sweep(search={"train.lr": {"loguniform": [1e-3, 1e-4]}}))
    with pytest.raises(UserError, match="ae.latent_chanels"):  # a field that does not exist, named
        parse_sweep(_sweep(search={"ae.latent_chanels": {"grid": [2, 4]}}))
    with pytest.raises(UserError, match="ae.latent_channels"):  # a value the field cannot take
        parse_sweep(_sweep(search={"ae.latent_channels": {"grid": ["many"]}}))
    with pytest.raises(UserError, match="asha compares trials on the generator"):
        parse_sweep(_sweep(base={"preset": "tiny"}, scheduler={"type": "asha"}))


def test_trial_names_are_deterministic_and_configs_carry_the_parameters():
    spec = parse_sweep(_sweep(resources={"num_workers": 1, "cpus_per_worker": 1}))
    params = {"ae.aux_decoder.width": 0.5, "ae.latent_channels": 4}
    assert trial_name(params) == trial_name(dict(reversed(list(params.items()))))
    assert trial_name(params).startswith("aux_decoder.width=0.5,latent_channels=4-")
    assert trial_name(params) != trial_name({**params, "ae.latent_channels": 2})
    config = trial_config(spec, params)
    assert config.ae.aux_decoder.width == 0.5 and config.ae.latent_channels == 4
    assert config.generator_train.steps == 8  # the base's own overrides


def test_metric_lookup_by_name_or_path():
    metrics = {"eval": {"samples": {"fd_randfeat": 3.5}}, "generator": {"diffusion_loss": 0.9}}
    assert metric_value(metrics, "fd_randfeat") == 3.5
    assert metric_value(metrics, "generator.diffusion_loss") == 0.9
    assert metric_value(metrics, "fid") is None and metric_value(metrics, "generator.nope") is None


def test_shipped_sweep_files_parse():
    root = Path(__file__).resolve().parents[1] / "sweeps"
    for path in sorted(root.glob("*.yaml")):
        spec = parse_sweep(yaml.safe_load(path.read_text()), str(path))
        assert spec.search and spec.metric


# ---------------------------------------------------------------------------------- with Ray


def _write(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _raylet_of(pid: str) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile
        return None
    return next((item[len(b"RAY_RAYLET_PID="):].decode() for item in environ if item.startswith(b"RAY_RAYLET_PID=")),
                None)


def _train_processes(ignore: frozenset = frozenset(), timeout: float = 30.0) -> list[str]:
    """This test session's Ray Train worker and controller processes alive, except `ignore` (Ray titles them
    `ray::<Actor>`). Processes of other Ray instances on the machine (a study running beside) do not count."""
    deadline = time.time() + timeout
    while True:
        listing = subprocess.run(["ps", "-eo", "pid=,ppid=,cmd="], capture_output=True, text=True).stdout.splitlines()
        rows = [line.split(None, 2) for line in listing if len(line.split(None, 2)) == 3]
        own_raylets = {pid for pid, ppid, cmd in rows if ppid == str(os.getpid()) and "raylet" in cmd.split()[0]}
        alive = [f"{pid} {cmd}" for pid, _, cmd in rows
                 if cmd.startswith(("ray::RayTrainWorker", "ray::TrainController")) and _raylet_of(pid) in own_raylets]
        alive = [line for line in alive if line.split()[0] not in ignore]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_asha_stops_the_worse_trial_which_releases_its_resources(ray_session, tmp_path):
    from raydae.sweep import run_sweep

    # One trial at a time, so ASHA's comparison is deterministic: the second trial (a learning rate so
    # large that Adam throws the DiT's weights about: its samples are not finite from step 6) reaches the
    # rung at step 6 after the first, and its sample probe is far worse.
    # Reports (each ~2 s, with a sample probe) only where ASHA decides: its rung at step 6, and the end at 8.
    # The probe scores in random features (eval.classifier_steps=0 trains no classifier): any space ranks a
    # diverged generator last.
    base = {**TINY_BASE, "set": {**TINY_BASE["set"], "generator_train.checkpoint_every": 6, "eval.classifier_steps": 0}}
    spec = _sweep(base=base, search={"generator_train.lr": {"grid": [1e-3, 0.5]}},
                  scheduler={"type": "asha", "grace_period": 6, "reduction_factor": 2}, max_concurrent=1)
    before = frozenset(line.split()[0] for line in _train_processes(timeout=0))  # earlier tests' idle actors
    summary = run_sweep(_write(tmp_path, spec), storage=str(tmp_path / "sweeps"))
    experiment = tmp_path / "sweeps" / "s"
    status = {row["generator_train.lr"]: row["status"] for row in summary["trials"]}
    assert status == {1e-3: "finished", 0.5: "stopped"}
    assert summary["best"]["generator_train.lr"] == 1e-3
    rows = list(csv.DictReader(open(experiment / "results.csv")))
    assert [row["status"] for row in rows] == ["finished", "stopped"]
    assert float(rows[0]["value"]) == pytest.approx(summary["best"]["value"])
    # ASHA pruned on the sample probe; each row shows it where the trial ended (the stopped one at its rung).
    finished_probe, stopped_probe = (float(row[SIGNALS["sample_fd"]]) for row in rows)
    assert int(rows[1]["generator_step"]) == 6 and stopped_probe > finished_probe > 0
    best = load_config(None, [str(experiment / "best_config.yaml")])
    assert best.generator_train.lr == 1e-3 and best.generator_train.steps == 8
    # The stopped trial's Train workers and controller are gone. (Their placement group is removed by
    # Ray Train's PlacementGroupCleaner, which needs the dashboard's State API: with `raydae`'s embedded
    # Ray every CPU was free again within 2 s; this test session runs without a dashboard.)
    assert _train_processes(ignore=before) == []
    stopped_run = experiment / "runs" / trial_name({"generator_train.lr": 0.5})
    assert not (stopped_run / "DONE").exists() and (stopped_run / "joint.done.json").exists()


def _asha_decisions(signal: str, reports: dict[str, list[dict]]) -> dict[str, str]:
    """Feed each trial's generator reports (in turn) to a fresh ASHA with this signal; its last decision per trial."""
    np.random.seed(0)
    asha = make_asha(Scheduler(type="asha", grace_period=2, reduction_factor=2, signal=signal), max_t=8)
    trials = {name: SimpleNamespace(trial_id=name) for name in reports}
    for trial in trials.values():
        asha.on_trial_add(None, trial)
    decisions = {}
    for name, trial in trials.items():
        for report in reports[name]:
            decisions[name] = asha.on_trial_result(None, trial, scheduler_metrics("generator", report))
            if decisions[name] == "STOP":
                break
    return decisions


def test_asha_prunes_on_the_sample_probe_not_on_a_loss_that_favours_small_latents():
    # Two latent sizes at the same generator steps: the 2-channel latent scores the lower diffusion loss
    # (a different quantity on a smaller latent), while its samples are further from the real images.
    reports = {
        "latent4": [{"step": 2, "loss/total": 0.50, "probe/fd": 20.0}, {"step": 4, "loss/total": 0.45, "probe/fd": 12.0}],
        "latent2": [{"step": 2, "loss/total": 0.20, "probe/fd": 45.0}, {"step": 4, "loss/total": 0.18, "probe/fd": 40.0}],
    }
    assert _asha_decisions("sample_fd", reports) == {"latent4": "CONTINUE", "latent2": "STOP"}
    # The same trials in the other order: the worse samples are stopped whatever the latent size.
    reversed_reports = dict(reversed(list(reports.items())))
    reversed_reports["latent4"] = [dict(r, **{"probe/fd": r["probe/fd"] + 40}) for r in reports["latent4"]]
    reversed_reports["latent2"] = [dict(r, **{"probe/fd": r["probe/fd"] - 40}) for r in reports["latent2"]]
    assert _asha_decisions("sample_fd", reversed_reports) == {"latent2": "CONTINUE", "latent4": "STOP"}
    # The loss signal, kept under a name that says so, prefers the smaller latent: the artefact it is named for.
    latent2_first = dict(reversed(list(reports.items())))
    assert _asha_decisions("train_loss_not_comparable", latent2_first) == {"latent2": "CONTINUE", "latent4": "STOP"}
    assert _asha_decisions("sample_fd", latent2_first) == {"latent2": "CONTINUE", "latent4": "CONTINUE"}


def test_scheduler_metrics_carry_both_signals_only_for_the_generator():
    report = {"step": 6, "loss/total": 0.3, "probe/fd": 7.5}
    assert scheduler_metrics("generator", report) == {"generator_step": 6, SIGNALS["train_loss_not_comparable"]: 0.3,
                                                      SIGNALS["sample_fd"]: 7.5}
    assert scheduler_metrics("stage1", report) == {}
    with pytest.raises(UserError, match="probe_samples"):
        parse_sweep(_sweep(scheduler={"type": "asha"}, base={"preset": "tiny", "set": {
            "generator": "dit", "generator_train.probe_samples": 0}}))
    with pytest.raises(UserError, match="scheduler.signal"):
        parse_sweep(_sweep(scheduler={"type": "asha", "signal": "loss"}))


def test_resume_of_a_sweep_that_never_ran_is_refused(tmp_path):
    from raydae.sweep import run_sweep

    with pytest.raises(UserError, match="no sweep at"):
        run_sweep(_write(tmp_path, _sweep()), resume=True, storage=str(tmp_path / "none"))


@pytest.mark.ray
def test_placement_groups_left_by_a_dead_train_controller_are_reclaimed(ray_session):
    """Ray Train's own cleaner can die (no dashboard, stale address file), leaving a stopped trial's CPUs reserved."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from raydae.tune_callback import ReclaimLeakedPlacementGroups

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for Ray Train's controller: it creates the workers' placement group
        def reserve(self):
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    dying, living = Controller.remote(), Controller.remote()
    orphan, kept = ray.get([dying.reserve.remote(), living.reserve.remote()])
    mine = placement_group([{"CPU": 0.01}])  # created by the driver itself: never touched
    ray.get(mine.ready())
    ray.kill(dying)
    time.sleep(1)
    try:
        assert placement_group_table()[orphan]["state"] == "CREATED"  # Ray keeps it while the job lives
        removed = ReclaimLeakedPlacementGroups().check()
        assert orphan in removed and kept not in removed and mine.id.hex() not in removed
        table = placement_group_table()
        assert table[orphan]["state"] == "REMOVED"
        assert table[kept]["state"] == "CREATED" and table[mine.id.hex()]["state"] == "CREATED"
    finally:
        ray.kill(living)
        ray.util.remove_placement_group(mine)


def test_a_diverged_generator_scores_the_worst_probe_value_and_is_stopped():
    from raydae.probe import DIVERGED_FD, _frechet_or_diverged

    rng = np.random.default_rng(0)
    real = rng.normal(size=(64, 4))
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    assert 0 < _frechet_or_diverged(rng.normal(size=(64, 4)), mu, sigma) < 1
    assert _frechet_or_diverged(np.full((64, 4), np.nan), mu, sigma) == DIVERGED_FD
    reports = {"fine": [{"step": 2, "loss/total": 0.5, "probe/fd": 20.0}],
               "diverged": [{"step": 2, "loss/total": float("nan"), "probe/fd": DIVERGED_FD}]}
    assert _asha_decisions("sample_fd", reports) == {"fine": "CONTINUE", "diverged": "STOP"}
