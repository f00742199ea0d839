"""Bad input refused before any work, in one line: `raydae eval` on a run with a missing or truncated checkpoint,
and a batch larger than the training split. Only the last test starts Ray (the eval checks run before it)."""

import json
import shutil

import pytest
import torch

from raydae.config import Config, load_config
from raydae.errors import UserError
from raydae.pipeline import RunOptions, check_batch_size, evaluate_folder, run_pipeline


def finished_run(root):
    """A finished DAE run folder as far as `raydae eval` reads it before starting Ray."""
    config = Config()
    config.generator = "dit"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(config.to_yaml())
    for step in ("stage1", "stage2", "generator"):
        checkpoint = root / step / "checkpoint_2026-01-01_00-00-00.000000"
        checkpoint.mkdir(parents=True)
        torch.save({"format": "raydae-checkpoint-v1", "stage": step, "models": {}}, checkpoint / "state.pt")
        (root / f"{step}.done.json").write_text(json.dumps({"checkpoint": str(checkpoint), "metrics": {}}))
    (root / "metrics.json").write_text(json.dumps({"mode": "dae", "eval": {"headline": "fd_shapesclf"}}))
    return root


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_eval_refuses_a_missing_generator_checkpoint(tmp_path):
    run = finished_run(tmp_path / "runs" / "dae-kl4-s0")
    generator = json.loads((run / "generator.done.json").read_text())["checkpoint"]
    (run / "generator" / generator.rsplit("/", 1)[1] / "state.pt").unlink()
    before = snapshot(run)
    with pytest.raises(UserError) as info:
        evaluate_folder(str(run), [], None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"generator checkpoint {generator} is missing (no state.pt); restore it")
    assert snapshot(run) == before  # nothing rewritten


def test_eval_refuses_a_gone_or_truncated_checkpoint(tmp_path):
    run = finished_run(tmp_path / "run")
    stage2 = json.loads((run / "stage2.done.json").read_text())["checkpoint"]
    data = (run / "stage2" / stage2.rsplit("/", 1)[1] / "state.pt").read_bytes()
    (run / "stage2" / stage2.rsplit("/", 1)[1] / "state.pt").write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    with pytest.raises(UserError, match=f"^stage2 checkpoint {stage2} cannot be read \\(.*\\); restore it") as info:
        evaluate_folder(str(run), [], None)
    assert "\n" not in str(info.value)
    assert snapshot(run) == before

    shutil.rmtree(run / "stage2")
    with pytest.raises(UserError, match=f"^stage2 checkpoint {stage2} (is missing|cannot be read)"):
        evaluate_folder(str(run), [], None)
    (run / "stage1.done.json").write_text("{not json")
    with pytest.raises(UserError, match="stage1.done.json cannot be read"):
        evaluate_folder(str(run), [], None)


def test_a_batch_larger_than_the_split_is_refused_in_one_line():
    check_batch_size("train.batch_size", 64, 64, "the training split")
    with pytest.raises(UserError) as info:
        check_batch_size("train.batch_size", 100000, 1577, "the training split of data.source=/data/x")
    assert str(info.value) == ("config train.batch_size=100000 is larger than the training split of "
                               "data.source=/data/x (1577 rows); set train.batch_size to at most 1577 or use more data")


@pytest.mark.ray
def test_a_batch_larger_than_the_training_split_is_refused_before_training(ray_session, tmp_path):
    config = load_config("tiny", overrides=["train.batch_size=100000", "data.train_size=64", "data.val_size=16"])
    with pytest.raises(UserError) as info:
        run_pipeline(config, RunOptions(storage=str(tmp_path), name="big-batch"))
    assert str(info.value).startswith("config train.batch_size=100000 is larger than the training split of "
                                      "data.source=builtin:shapes (64 rows)")
    assert not (tmp_path / "big-batch").exists()  # refused before the run folder was made
