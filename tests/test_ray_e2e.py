"""End-to-end Ray Train tests on tiny data: both DAE stages on 2 workers, resume, refusal, fault recovery.

Automatic restart of a stage's workers from its checkpoint is tested with a lost node (tests/test_multinode.py).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from raydae.checkpoints import load_state
from raydae.cli import main
from raydae.config import load_config
from raydae.errors import UserError
from raydae.pipeline import RunOptions, run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _encoder_of(checkpoint: str) -> dict:
    return load_state(checkpoint)["models"]["encoder"]


# One whole chain on 2 workers, shared by the tests below: DAE's two stages, a DiT on their latents, evaluation.
DAE_DIT = ["scaling.num_workers=2", "generator=dit", "dit.model=DiT-T/2", "train.checkpoint_every=100",
           "generator_train.steps=4", "generator_train.batch_size=16", "generator_train.log_every=2",
           "generator_train.checkpoint_every=100", "generator_train.image_every=2", "dit.sample_steps=3",
           "eval.enabled=true", "generator_train.probe_samples=16", "generator_train.probe_sample_steps=2",
           "eval.latent_quality_images=32", "eval.latent_probe_steps=3", "eval.sensitivity_images=32"]


@pytest.fixture(scope="module")
def dae_run(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    config = load_config("tiny", overrides=DAE_DIT)
    options = RunOptions(storage=str(storage), name="dae2")
    metrics = run_pipeline(config, options)
    return config, options, metrics, storage / "dae2"


def test_dae_runs_both_stages_on_two_workers(dae_run):
    config, _, metrics, run_dir = dae_run
    assert set(metrics["stages"]) == {"stage1", "stage2"}
    for stage in ("stage1", "stage2"):
        summary = metrics["stages"][stage]
        assert summary["steps"] == config.stage_steps(stage)
        assert 0 < summary["val_mse"] < 1 and summary["val_psnr"] > 0 and -1 <= summary["val_ssim"] <= 1
        assert summary["images_per_second"] > 0 and summary["wall_seconds"] > 0
        assert list((run_dir / "tensorboard" / stage).glob("events.out.tfevents.*"))
        state = load_state(summary["checkpoint"])
        assert state["step"] == config.stage_steps(stage) and state["history"][-1]["world_size"] == 2
        assert state["config"] == config.to_dict()  # the checkpoint can rebuild its models alone
    assert metrics["parameters"]["aux_decoder"] < metrics["parameters"]["decoder"]
    assert (run_dir / "DONE").exists() and (run_dir / "config.yaml").exists()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["stages"]["stage2"]["val_mse"] == metrics["stages"]["stage2"]["val_mse"]


def test_stage2_kept_stage1_encoder_bit_for_bit(dae_run):
    _, _, metrics, _ = dae_run
    first = _encoder_of(metrics["stages"]["stage1"]["checkpoint"])
    second = _encoder_of(metrics["stages"]["stage2"]["checkpoint"])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_finished_run_is_refused_unless_resume(dae_run):
    config, options, metrics, run_dir = dae_run
    with pytest.raises(UserError, match="already finished.*--resume.*--overwrite"):
        run_pipeline(config, options)
    again = run_pipeline(config, RunOptions(storage=options.storage, name=options.name, resume=True))
    assert again["stages"] == metrics["stages"]  # nothing retrained


def test_changed_config_on_an_existing_run_is_refused(dae_run, tmp_path):
    config, options, _, run_dir = dae_run
    (run_dir / "DONE").rename(run_dir / "DONE.bak")  # look unfinished
    try:
        changed = load_config("tiny", overrides=DAE_DIT + ["ae.latent_channels=3"])
        with pytest.raises(UserError, match=r"different config \(ae.latent_channels: 2 -> 3\)"):
            run_pipeline(changed, options)
    finally:
        (run_dir / "DONE.bak").rename(run_dir / "DONE")


def test_stage2_refuses_a_stage1_checkpoint_of_another_latent_shape(dae_run, tmp_path):
    _, _, metrics, _ = dae_run
    other = load_config("tiny", overrides=["ae.latent_channels=3"])
    with pytest.raises(UserError) as err:
        run_pipeline(other, RunOptions(storage=str(tmp_path), name="x",
                                       stage1_from=metrics["stages"]["stage1"]["checkpoint"]))
    assert "kl latent 2x8x8" in str(err.value) and "kl latent 3x8x8" in str(err.value)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def _check_samples(run_dir: Path, tmp_path: Path):
    from PIL import Image

    from raydae.sampling import sample_run

    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (8 * 18 + 2, 8 * 18 + 2)  # 64 samples of 16x16 with 2-pixel gaps
    assert list((run_dir / "tensorboard" / "generator").glob("events.out.tfevents.*"))
    images = sample_run(str(run_dir), n=5, out=str(tmp_path / "g.png"), out_dir=None, seed=7, steps=2, cfg=None)
    again = sample_run(str(run_dir), n=5, out=None, out_dir=None, seed=7, steps=2, cfg=None)
    assert images.shape == (5, 3, 16, 16) and torch.equal(images, again)
    # Seeds a batch apart share no images (seed + start would give seed 7's second batch seed 9's first).
    seven = sample_run(str(run_dir), n=4, out=None, out_dir=None, seed=7, steps=2, cfg=None, batch_size=2)
    nine = sample_run(str(run_dir), n=2, out=None, out_dir=None, seed=9, steps=2, cfg=None, batch_size=2)
    assert not torch.equal(seven[2:], nine)


def _check_skipping(config, options, run_dir: Path, capsys, steps: tuple[str, ...]):
    """Re-running the same command after the last marker is lost: finished steps are skipped."""
    (run_dir / "DONE").unlink()
    capsys.readouterr()
    run_pipeline(config, options)
    out = capsys.readouterr().out
    for step in steps:
        assert f"[{step}] already finished; skipping" in out
    assert (run_dir / "DONE").exists()


# Skipping finished steps is checked on the VQ chain below: here a rerun would evaluate the whole run again.
def test_dit_chain_evaluates_and_writes_samples(dae_run, tmp_path):
    _, options, metrics, run_dir = dae_run
    assert metrics["generator"]["steps"] == 4 and metrics["parameters"]["generator"] > 0
    # The sample probe scored the final generator; the latent measures were taken before it trained.
    assert math.isfinite(metrics["generator"]["probe_fd"]) and metrics["generator"]["probe_fd"] > 0
    assert metrics["generator"]["probe_seconds"] > 0
    # Rank 0 read every held-out latent straight from its Parquet files and scored the EMA generator on them.
    assert 0 < metrics["generator"]["diffusion_loss"] < 5
    assert json.loads((run_dir / "generator.done.json").read_text())["metrics"]["val/latents"] == 64
    quality = metrics["latent_quality"]
    assert 0 < quality["hf_energy"] < 1 and quality["channel_std_mean"] > 0
    assert quality["equivariance_decoder_error"] > 0 and quality["equivariance_encoder_error"] > 0
    assert 0 < quality["probe_generator_loss"] < 10  # a v-loss on unit-std latents after 3 steps
    assert json.loads((run_dir / "latent_quality.json").read_text()) == quality
    sensitivity = metrics["eval"]["feature_sensitivity"]["shapesclf"]
    assert sensitivity["num_images"] == 16 and len(sensitivity["blur"]["fd"]) == 3
    _check_evaluation(metrics, run_dir, Path(options.storage))
    _check_samples(run_dir, tmp_path)


def test_vq_chain_rerun_after_a_failure_continues_then_writes_samples_and_skips_finished_steps(ray_session, tmp_path,
                                                                                               capsys):
    overrides = ["ae.bottleneck=vq", "generator=vq_prior", "prior.model=prior-T", "train.mode=joint",
                 "train.joint_steps=4", "train.checkpoint_every=2", "train.fail_at_step=3", "scaling.max_failures=0",
                 "generator_train.steps=4", "generator_train.batch_size=16", "generator_train.log_every=2",
                 "generator_train.checkpoint_every=100", "generator_train.image_every=2"]
    config = load_config("tiny", overrides=overrides)
    options = RunOptions(storage=str(tmp_path), name="chain")
    run_dir = tmp_path / "chain"
    # With no retries left, the injected failure ends the run; the same command again continues it.
    with pytest.raises(UserError, match="joint failed: RuntimeError: injected failure at step 3"):
        run_pipeline(config, options)
    assert not (run_dir / "DONE").exists() and not (run_dir / "joint.done.json").exists()
    capsys.readouterr()
    # The same command again, as a user types it (`raydae run`), continues it and ends with the run summary.
    assert main(["run", "--preset", "tiny", "--storage", str(tmp_path), "--name", "chain",
                 *(arg for override in overrides for arg in ("--set", override))]) == 0
    assert f"run summary ({run_dir}, joint, " in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = load_state(metrics["stages"]["joint"]["checkpoint"])["history"]
    assert [a["attempt_start_step"] for a in history] == [0, 2]  # from the step-2 checkpoint, not from step 0
    assert history[1]["data_position"] == {"pass": 0, "batch": 2}  # and after the two batches it had used
    assert metrics["generator"]["steps"] == 4 and metrics["parameters"]["generator"] > 0 and "eval" not in metrics
    assert 0 < metrics["generator"]["cross_entropy"] < 10  # held-out codes, read by rank 0 from Parquet
    _check_samples(run_dir, tmp_path)
    _check_skipping(config, options, run_dir, capsys, ("joint", "generator"))


def test_eval_command_scores_a_finished_run_and_report_draws_it(dae_run, tmp_path, capsys):
    run_dir = dae_run[3]
    assert main(["eval", str(run_dir), "--set", "ae.latent_channels=3"]) == 2
    assert "only takes eval.* settings" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--set", "eval.num_reconstructions=16", "--set", "eval.classifier_steps=0",
                 "--set", "eval.latent_distance_steps=0"]) == 0
    ev = json.loads((run_dir / "metrics.json").read_text())["eval"]
    # Scored again with the new settings; the floor is the first evaluation's, from as many held-out real
    # images as there are samples (this one's 16 reconstructions make a noisier floor).
    floor = dae_run[2]["eval"]["real_vs_real"]["fd_randfeat"]
    assert ev["samples"]["num"] == 32 and math.isfinite(ev["samples"]["fd_randfeat"])
    assert ev["samples"]["fd_randfeat"] > floor
    assert ev["headline"] == "fd_randfeat" and ev["reconstruction"]["decoder"]["images"] == 16
    assert 0 < ev["real_vs_real"]["fd_randfeat"] < math.inf and ev["complexity"]["encoder"]["parameters"] > 0
    assert "stages" in json.loads((run_dir / "metrics.json").read_text())  # the rest is kept

    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").exists() and (run_dir / "report" / "loss_curves.png").exists()


def _check_evaluation(metrics: dict, run_dir: Path, tmp_path: Path) -> None:
    """The run ended with its evaluation, in every feature space this data set has."""
    ev = metrics["eval"]
    assert ev["headline"] == "fd_shapesclf" and ev["samples"]["num"] == 32
    # A 4-step DiT's samples lie further from the real images than as many held-out real images do.
    floor = ev["real_vs_real"]
    for key in ("fd_shapesclf", "fd_randfeat"):
        assert math.isfinite(ev["samples"][key]) and ev["samples"][key] > floor[key] > 0
    assert 0 < ev["samples"]["kd_randfeat"] < math.inf
    for key in ("precision_randfeat", "recall_shapesclf"):
        assert 0 <= ev["samples"][key] <= 1  # fractions (NaN fails too)
    assert abs(sum(ev["samples"]["class_fractions"].values()) - 1) < 1e-6
    assert set(ev["reconstruction"]) == {"aux_decoder", "decoder"}
    assert ev["reconstruction"]["decoder"]["mse"] > 0 and ev["reconstruction"]["decoder"]["fd_randfeat"] > 0
    complexity = ev["complexity"]
    assert complexity["decoder"]["flops_per_image"] > complexity["aux_decoder"]["flops_per_image"] > 0
    assert complexity["generator"]["flops_per_sample"] > complexity["generator"]["flops_per_forward"] > 0
    assert complexity["decoder"]["lipschitz_upper_bound"] is None  # GroupNorm: no true bound, and it says so
    assert "GroupNorm" in complexity["decoder"]["lipschitz_upper_bound_note"]
    assert ev["latent_distance"]["decoder_steps"] == 5 and "real_vs_real" in ev["latent_distance"]
    assert list((tmp_path / "eval_cache").glob("classifier-*.pt"))
    assert json.loads((run_dir / "metrics.json").read_text())["eval"]["headline"] == "fd_shapesclf"

