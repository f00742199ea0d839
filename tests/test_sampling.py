"""`raydae sample` refuses what it cannot draw from in one line (exit 2), before writing anything."""

import json
from pathlib import Path

import pytest

from raydae.cli import main
from raydae.config import load_config


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("raydae: error:")]


def _run_folder(tmp_path: Path, checkpoint_config: str | None) -> Path:
    """A run folder with config.yaml and generator.done.json whose checkpoint holds `checkpoint_config`
    (None: the checkpoint folder is gone)."""
    run = tmp_path / "runs" / "dae-kl2-s0"
    run.mkdir(parents=True)
    run.joinpath("config.yaml").write_text(load_config("tiny", [], ["generator=dit"]).to_yaml())
    checkpoint = run / "generator" / "checkpoint_000"
    if checkpoint_config is not None:
        checkpoint.mkdir(parents=True)
        checkpoint.joinpath("config.yaml").write_text(checkpoint_config)
    run.joinpath("generator.done.json").write_text(json.dumps({"checkpoint": str(checkpoint), "metrics": {}}))
    return run


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_refuses_a_count_below_one(n, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path), "--n", n, "--out", str(out)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and f"--n {n}" in lines[0]
    assert not out.exists()


def test_sample_refuses_another_runs_generator(tmp_path, capsys):
    other = load_config("tiny", [], ["generator=dit", "train.seed=5", "ae.latent_channels=4"]).to_yaml()
    run = _run_folder(tmp_path, other)
    before = sorted(p.name for p in run.rglob("*"))
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--out", str(out)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "trained by another run" in lines[0] and "train.seed" in lines[0], lines
    assert not out.exists() and sorted(p.name for p in run.rglob("*")) == before


def test_sample_refuses_a_missing_generator_checkpoint(tmp_path, capsys):
    run = _run_folder(tmp_path, None)
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--out", str(out)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "cannot be read" in lines[0] and "checkpoint_000" in lines[0], lines
    assert not out.exists()


def test_sample_refuses_a_folder_without_config(tmp_path, capsys):
    run = _run_folder(tmp_path, load_config("tiny", [], ["generator=dit"]).to_yaml())
    run.joinpath("config.yaml").unlink()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "no config.yaml" in lines[0]


def test_sample_refuses_a_truncated_generator_checkpoint(tmp_path, capsys):
    run = _run_folder(tmp_path, load_config("tiny", [], ["generator=dit"]).to_yaml())
    (run / "generator" / "checkpoint_000" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "cannot be read" in lines[0], lines
