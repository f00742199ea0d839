"""Bad input at the command line: one clear line, exit status 2, no traceback, no run folder.

Each entry point runs as a process of its own; the rest of the command line's behaviour is checked by calling
`main` in the test process (a fresh interpreter costs seconds of imports each).
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydae.cli import main
from raydae.config import load_config
from raydae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "raydae run": [sys.executable, "-m", "raydae.cli", "run"],
    "python -m raydae.run": [sys.executable, "-m", "raydae.run"],
    "python raydae/run.py": [sys.executable, str(ROOT / "raydae" / "run.py")],
}


def _run(args, tmp_path, entry="raydae run"):
    cmd = ENTRY_POINTS[entry] + list(args) + ["--storage", str(tmp_path / "runs")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _main(args, capsys):
    """`raydae ARGS` in this process: its exit status and what it printed."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("raydae: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_reports_an_unknown_key(entry, tmp_path):
    proc = _run(["--preset", "tiny", "--set", "ae.latent_chanels=3"], tmp_path, entry)
    _assert_one_line_error(proc, "ae.latent_chanels", "ae.latent_channels")
    assert not (tmp_path / "runs").exists()


def test_a_config_mistake_is_answered_before_torch_and_ray_load(tmp_path):
    probe = ("import sys; from raydae.cli import main; "
             "code = main(['run', '--preset', 'tiny', '--set', 'ae.latent_chanels=3']); "
             "print(code, 'torch' in sys.modules, 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr


def test_run_py_works_as_a_lone_file(tmp_path):
    """`ray submit` copies only raydae/run.py to the head node: it must import the installed package."""
    lone = tmp_path / "run.py"
    lone.write_text((ROOT / "raydae" / "run.py").read_text())
    proc = subprocess.run([sys.executable, str(lone), "--set", "ae.latent_chanels=3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _assert_one_line_error(proc, "ae.latent_channels")


def test_wrong_value_type(tmp_path, capsys):
    proc = _main(["run", "--preset", "tiny", "--set", "train.batch_size=big", "--storage", str(tmp_path / "runs")],
                 capsys)
    _assert_one_line_error(proc, "train.batch_size", "expected an integer")


def test_missing_data_path_fails_before_anything_is_written(tmp_path, capsys):
    proc = _main(["run", "--preset", "tiny", "--set", f"data.source={tmp_path}/nope",
                  "--storage", str(tmp_path / "runs")], capsys)
    _assert_one_line_error(proc, f"{tmp_path}/nope", "no such file or directory")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["--debug", "run"], ["run", "--debug"]])
def test_debug_shows_the_traceback(tmp_path, capsys, args):
    proc = _main([*args, "--set", "train.lr=x", "--storage", str(tmp_path / "runs")], capsys)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "train.lr" in proc.stderr


def test_config_command_prints_the_resolved_config(capsys):
    proc = _main(["config", "--preset", "tiny", "--set", "ae.latent_channels=5"], capsys)
    assert proc.returncode == 0
    assert load_config("tiny", overrides=["ae.latent_channels=5"]).to_yaml() == proc.stdout


@pytest.mark.ray
def test_gpus_requested_where_the_cluster_has_none(ray_session):
    from raydae.launch import check_resources

    config = load_config("tiny", overrides=["scaling.use_gpu=true"])
    with pytest.raises(UserError, match="asks for 1 GPUs but this machine's Ray has 0.*scaling.use_gpu=false"):
        check_resources(config, local=True)
