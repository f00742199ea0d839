"""The DAE study: its statistics on fixed numbers (no Ray), its file checks, and a tiny study on Ray."""

import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from raydae.errors import UserError
from raydae.study import compare, markdown, paired_difference, spread, stage1_outliers, t_quantile_975
from raydae.sweep_spec import ARM_KEY, SEED_KEY, parse_sweep, trial_config


def test_spread_and_paired_difference_on_fixed_numbers():
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["sd"] == pytest.approx(math.sqrt(5 / 3))
    # Per-seed differences 1, 1.2, 0.8, 1.0: mean 1, sd sqrt(0.08/3), t = mean / (sd / 2).
    baseline = {0: 10.0, 1: 12.0, 2: 11.0, 3: 13.0}
    arm = {0: 11.0, 1: 13.2, 2: 11.8, 3: 14.0}
    d = paired_difference(arm, baseline)
    sd = math.sqrt(0.08 / 3)
    assert d["seeds"] == [0, 1, 2, 3] and d["diff_mean"] == pytest.approx(1.0)
    assert d["diff_sd"] == pytest.approx(sd) and d["stderr"] == pytest.approx(sd / 2)
    assert d["t"] == pytest.approx(1.0 / (sd / 2))
    assert d["ci95"][0] == pytest.approx(1.0 - 3.182 * sd / 2)
    assert d["significant"] is True
    # The seeds vary far more (sd ~1.3) than the arms differ: consistent, but not beyond the seed spread.
    assert d["exceeds_spread"] is False


def test_a_difference_inside_the_noise_is_neither_significant_nor_beyond_the_spread():
    d = paired_difference({0: 1.0, 1: 3.0, 2: 2.0}, {0: 2.0, 1: 2.0, 2: 2.5})
    assert d["diff_mean"] == pytest.approx(-0.5 / 3) and d["significant"] is False and d["exceeds_spread"] is False
    assert d["ci95"][0] < 0 < d["ci95"][1]
    # Only seeds both arms finished are paired; one seed is too few for any verdict.
    lone = paired_difference({0: 1.0, 5: 2.0}, {0: 1.5})
    assert lone["seeds"] == [0] and lone["significant"] is None and math.isnan(lone["stderr"])
    big = paired_difference({0: 10.0, 1: 10.1, 2: 9.9}, {0: 1.0, 1: 1.2, 2: 0.9})
    assert big["exceeds_spread"] is True and big["significant"] is True
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    # past the table: the exact quantiles are 2.0395 (31), 2.0003 (60), 1.9840 (100)
    assert [round(t_quantile_975(df), 4) for df in (31, 60, 100)] == [2.0395, 2.0003, 1.984]


def test_collapsed_stage1_seeds_are_flagged():
    assert stage1_outliers({0: 0.02, 1: 0.021, 2: 0.09, 3: 0.019}) == [2]
    assert stage1_outliers({0: 0.02, 1: 0.021}) == []


def test_compare_and_table_from_fixture_runs():
    def run(arm, seed, fd, mse, stage1=0.02):
        return {"arm": arm, "seed": seed, "group": "", "metrics": {
            "eval": {"samples": {"fd": fd}, "reconstruction": {"decoder": {"mse": mse}}},
            "stages": {"stage1": {"val_mse": stage1}}}}

    runs = [run("joint", 0, 30.0, 0.010), run("joint", 1, 31.0, 0.011),
            run("dae", 0, 29.0, 0.012), run("dae", 1, 29.5, 0.013, stage1=0.2)]
    metrics = ["eval.samples.fd", "eval.reconstruction.decoder.mse"]
    (block,) = compare(runs, ["joint", "dae"], "joint", metrics)
    dae = block["arms"]["dae"]
    assert dae["metrics"]["eval.samples.fd"]["mean"] == pytest.approx(29.25)
    assert dae["differences"]["eval.samples.fd"]["diff_mean"] == pytest.approx(-1.25)
    assert block["arms"]["joint"]["differences"] == {}
    schedules = {a: {"total_ae_steps": 4, "final_decoder_steps": 2, "final_decoder": "w1 b1 d0", "aux_decoder": "-"}
                 for a in ("joint", "dae")}
    text = markdown([block], {"joint": "joint", "dae": "DAE"}, "joint", metrics, schedules)
    assert "| dae | 2 | 29.25 ± 0.3536 | -1.25 ± 0.25 (stderr)" in text
    # A diverged seed (NaN) and a seed the baseline lacks are named in the seeds cell, not silently dropped.
    runs += [run("dae", 2, float("nan"), 0.012), run("dae", 3, 28.0, 0.012)]
    (block,) = compare(runs, ["joint", "dae"], "joint", metrics)
    text = markdown([block], {"joint": "joint", "dae": "DAE"}, "joint", metrics, schedules)
    assert "| dae | 3 (no value: seed 2); 2 paired | 28.83 ± 0.7638 | -1.25 ± 0.25 (stderr)" in text
    assert "| dae | 4; 2 paired | 0.01225 ± 0.0005 |" in text
    assert "dae seed(s) 1" in text  # a collapsed stage 1 is reported, and kept
    from raydae.report import study_figure

    figure = study_figure([block], metrics)
    assert [ax.get_title() for ax in figure.axes] == ["samples.fd", "reconstruction.decoder.mse"]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["joint", "dae"]
    with pytest.raises(UserError, match="baseline 'x'"):
        compare(runs, ["joint", "dae"], "x", metrics)


def test_only_what_the_trials_run_must_match_when_a_study_is_run_again():
    from raydae.sweep import _what_trials_run

    saved = parse_sweep(_study()).to_dict()
    retitled = _study(study={"arms": {**ARMS, "dae": {**ARMS["dae"], "label": "DAE, new title"}}, "seeds": [0, 1],
                             "baseline": "joint", "metrics": ["final_decoder.val_psnr"], "pairs": [["dae", "joint"]]})
    assert _what_trials_run(parse_sweep(retitled).to_dict()) == _what_trials_run(saved)  # tables only: redrawn
    for changed in (_study(max_concurrent=1), _study(study={"arms": ARMS, "seeds": [0, 1, 2], "baseline": "joint"}),
                    _study(study={"arms": {**ARMS, "dae": {"set": {**ARMS["dae"]["set"], "ae.aux_decoder.width": 0.25}}},
                                  "seeds": [0, 1], "baseline": "joint"})):
        assert _what_trials_run(parse_sweep(changed).to_dict()) != _what_trials_run(saved)


def test_a_pair_of_arms_is_compared_like_an_arm_with_the_baseline():
    def run(arm, seed, fd):
        return {"arm": arm, "seed": seed, "group": "", "metrics": {"eval": {"samples": {"fd": fd}}}}

    # joint with the full decoder is the baseline; the question is DAE against joint with the same small one
    runs = [run("joint", 0, 30.0), run("joint", 1, 31.0), run("joint", 2, 29.0),
            run("joint_small", 0, 40.0), run("joint_small", 1, 42.0), run("joint_small", 2, 41.0),
            run("dae_small", 0, 41.0), run("dae_small", 1, 42.9), run("dae_small", 2, 42.1)]
    arms, metrics = ["joint", "joint_small", "dae_small"], ["eval.samples.fd"]
    (block,) = compare(runs, arms, "joint", metrics, [["dae_small", "joint_small"]])
    (pair,) = block["pairs"]
    d = pair["differences"]["eval.samples.fd"]
    assert (pair["arm"], pair["reference"]) == ("dae_small", "joint_small")
    assert d["seeds"] == [0, 1, 2] and d["diff_mean"] == pytest.approx(1.0)  # 1.0, 0.9, 1.1
    assert d["significant"] is True  # every seed the same way, little spread
    assert block["arms"]["dae_small"]["differences"]["eval.samples.fd"]["diff_mean"] == pytest.approx(12.0)
    schedules = {a: {"total_ae_steps": 4, "final_decoder_steps": 2, "final_decoder": "w1 b1 d0", "aux_decoder": "-"}
                 for a in arms}
    text = markdown([block], {a: a for a in arms}, "joint", metrics, schedules)
    assert "| dae_small − joint_small | 3 | — | 1 ± " in text and "the file's `pairs:`" in text
    assert "pairs:" not in markdown(compare(runs, arms, "joint", metrics), {}, "joint", metrics, schedules)


STUDY_BASE = {"preset": "tiny", "set": {"train.checkpoint_every": 100}}  # no evaluation: stage metrics suffice
ARMS = {"joint": {"label": "joint, 4 steps", "set": {"train.mode": "joint", "train.joint_steps": 4}},
        "dae": {"label": "DAE half-width aux, 2+2 steps",
                "set": {"train.mode": "dae", "train.stage1_steps": 2, "train.stage2_steps": 2,
                        "ae.aux_decoder.width": 0.5}}}


def _study(**overrides) -> dict:
    spec = {"name": "st", "base": STUDY_BASE, "metric": "final_decoder.val_mse", "max_concurrent": 3,
            "study": {"arms": ARMS, "seeds": [0, 1], "baseline": "joint",
                      "metrics": ["final_decoder.val_mse", "final_decoder.val_psnr"]}}
    spec.update(overrides)
    return spec


def test_study_file_checks():
    spec = parse_sweep(_study())
    assert list(spec.space()) == [ARM_KEY, SEED_KEY]
    config = trial_config(spec, {ARM_KEY: "dae", SEED_KEY: 1})
    assert config.train.mode == "dae" and config.train.seed == 1 and config.ae.aux_decoder.width == 0.5
    with pytest.raises(UserError, match="use scheduler: fifo"):
        parse_sweep(_study(scheduler={"type": "asha"}, base={"preset": "tiny", "set": {"generator": "dit"}}))
    with pytest.raises(UserError, match="baseline: 'nope'"):
        parse_sweep(_study(study={"arms": ARMS, "seeds": [0, 1], "baseline": "nope"}))
    with pytest.raises(UserError, match="at least two distinct integers"):
        parse_sweep(_study(study={"arms": ARMS, "seeds": [0], "baseline": "joint"}))
    unfair = {**ARMS, "dae": {"set": {**ARMS["dae"]["set"], "generator_train.steps": 7}}}
    with pytest.raises(UserError, match="arms differ in `generator_train`"):
        parse_sweep(_study(study={"arms": unfair, "seeds": [0, 1], "baseline": "joint"}))
    with pytest.raises(UserError, match="num_samples is 2; a study repeats its arms over study.seeds"):
        parse_sweep(_study(num_samples=2))
    with pytest.raises(UserError, match="set by the study section"):
        parse_sweep(_study(search={"train.seed": {"grid": [0, 1]}}))
    assert "pairs" not in spec.study  # a study saved before `pairs:` existed is still the same file
    paired = parse_sweep(_study(study={"arms": ARMS, "seeds": [0, 1], "baseline": "joint", "pairs": [["dae", "joint"]]}))
    assert paired.study["pairs"] == [["dae", "joint"]]
    for bad in ([["dae", "nope"]], [["dae", "dae"]], ["dae"], "dae"):
        with pytest.raises(UserError, match="pairs: .*e.g. pairs: "):
            parse_sweep(_study(study={"arms": ARMS, "seeds": [0, 1], "baseline": "joint", "pairs": bad}))


def test_the_table_names_each_arms_budget_and_decoders():
    from raydae.sweep import arm_schedule

    spec = parse_sweep(_study())
    dae = arm_schedule(trial_config(spec, {ARM_KEY: "dae", SEED_KEY: 0}))
    assert dae == {"mode": "dae", "total_ae_steps": 4, "final_decoder_steps": 2,
                   "final_decoder": "w1 b1 d0", "aux_decoder": "w0.5 b1 d0"}
    joint = arm_schedule(trial_config(spec, {ARM_KEY: "joint", SEED_KEY: 0}))
    assert joint == {"mode": "joint", "total_ae_steps": 4, "final_decoder_steps": 4,
                     "final_decoder": "w1 b1 d0", "aux_decoder": "-"}


def test_shipped_study_files_parse():
    from pathlib import Path

    from raydae.sweep_spec import load_sweep

    files = sorted(Path(__file__).parent.parent.joinpath("studies").glob("*.yaml"))
    assert files, "studies/ ships no study file"
    for path in files:
        assert load_sweep(str(path)).study, path


# The Ray study: two joint arms (one fit per trial; DAE's two-stage chain is tested in test_ray_e2e), two seeds.
E2E_ARMS = {"joint": {"label": "joint, 4 steps", "set": {"train.mode": "joint", "train.joint_steps": 4}},
            "narrow": {"label": "joint, half-width decoder, 4 steps",
                       "set": {"train.mode": "joint", "train.joint_steps": 4, "ae.decoder.width": 0.5}}}


def _read_lines(stream, lines: list) -> None:
    """(seconds on the monotonic clock, line) as the pipe delivers them."""
    for raw in stream:
        lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_two_arm_two_seed_study_end_to_end_survives_a_killed_driver(ray_session, tmp_path):
    """The tiny study, with its driver killed once a trial has finished: `--resume` runs the rest, not that one.

    The driver's console is a pipe (`raydae study ... | tee log`): its progress lines arrive as they happen."""
    from raydae.sweep import run_sweep

    base = {"preset": "tiny", "set": {"train.checkpoint_every": 100, "train.log_every": 2}}
    spec = _study(base=base, max_concurrent=2, study={"arms": E2E_ARMS, "seeds": [0, 1], "baseline": "joint",
                                                      "metrics": ["final_decoder.val_mse", "final_decoder.val_psnr"]})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = tmp_path / "studies"
    runs = storage / "st" / "runs"
    # A driver in its own process, on the shared cluster, killed once the first trial has finished
    # (two trials at a time: the other two have not started, so resume must run them).
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)  # line-by-line output must not depend on it
    driver = subprocess.Popen(
        [sys.executable, "-m", "raydae.cli", "study", str(path), "--storage", str(storage), "--address", address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    lines: list = []
    reader = threading.Thread(target=_read_lines, args=(driver.stdout, lines), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while not list(runs.glob("*/DONE")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        first_done = time.monotonic()
        finished = list(runs.glob("*/DONE"))
        assert finished, "no trial finished before the driver was killed\n" + "\n".join(line for _, line in lines)
        time.sleep(2)  # let Tune record the trial as finished
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        reader.join(timeout=10)
    text = "\n".join(line for _, line in lines)
    # A trial's step line crossed the pipe before its fit ended (its checkpoint, shutdown and DONE take seconds);
    # a block-buffered console would hold it until the driver exits, and a killed driver never flushes.
    steps = [t for t, line in lines if "[joint] step" in line]
    assert steps and steps[0] < first_done, text
    # Ray's own harmless noise stays off the console: the placement-group cleaner's lines, the progress-bar notice,
    # a stopped trial actor's traceback.
    noise = ("PlacementGroupCleaner", "Progress bars disabled", "Traceback")
    assert [line for _, line in lines if any(word in line for word in noise)] == [], text
    finished = {done: done.stat().st_mtime for done in runs.glob("*/DONE")}
    assert 1 <= len(finished) <= 2

    summary = run_sweep(str(path), resume=True, storage=str(storage))
    assert [row["status"] for row in summary["trials"]] == ["finished"] * 4
    assert all(done.stat().st_mtime == mtime for done, mtime in finished.items())  # not run again
    assert len(list(runs.glob("*/DONE"))) == 4
    (block,) = summary["study"]["groups"]
    for arm in E2E_ARMS:
        assert block["arms"][arm]["seeds"] == [0, 1]
        mse = block["arms"][arm]["metrics"]["final_decoder.val_mse"]
        assert mse["n"] == 2 and all(0 < v < 1 for v in mse["values"].values())
    diff = block["arms"]["narrow"]["differences"]["final_decoder.val_mse"]
    values = {arm: block["arms"][arm]["metrics"]["final_decoder.val_mse"]["values"] for arm in E2E_ARMS}
    assert diff["diff_mean"] == pytest.approx(sum(values["narrow"][s] - values["joint"][s] for s in (0, 1)) / 2)
    text = (storage / "st" / "study.md").read_text()
    assert "| narrow | joint, half-width decoder, 4 steps | 4 | 4 | w0.5 b1 d0 |" in text
    assert "**final_decoder.val_psnr**" in text
    assert (storage / "st" / "study.json").exists() and (storage / "st" / "study.png").exists()
    assert "](study.png)" in text
    path.write_text(yaml.safe_dump({**spec, "max_concurrent": 1}))
    with pytest.raises(UserError, match="different sweep file"):
        run_sweep(str(path), storage=str(storage))
