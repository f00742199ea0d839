"""What a user sees on the console: the progress convention, Ray's lines kept or dropped, and the short summary at
the end of a run. (That progress lines cross a pipe as they happen is checked on a real driver in test_study.py.)"""

import math
import time

import pytest
from ray._private.ray_logging import LogDeduplicator

from raydae import scoring
from raydae.launch import _filtered
from raydae.ray_env import QUIET_RAY_ENV
from raydae.progress import Progress, format_seconds, heartbeat
from raydae.summary import run_summary


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_prints_per_fraction_and_per_interval(capsys):
    clock = FakeClock()
    progress = Progress("latents", "encoding", total=100, unit="images", every_s=10, every_fraction=0.25, clock=clock)
    for _ in range(100):
        progress.advance(1)
    clock.now = 12.0
    progress.finish()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[latents] encoding: started (100 images)"
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines[1:-1]] == \
        ["25/100 images (25%)", "50/100 images (50%)", "75/100 images (75%)"]
    assert lines[-1] == "[latents] encoding: done, 100/100 images (100%), 12s"


def test_progress_without_a_total_prints_per_interval(capsys):
    clock = FakeClock()
    progress = Progress("eval", "waiting", every_s=10, clock=clock, announce=False)
    for second in range(35):
        clock.now = float(second)
        progress.advance(1)
    assert capsys.readouterr().out.splitlines() == \
        ["[eval] waiting: 11, 10s", "[eval] waiting: 21, 20s", "[eval] waiting: 31, 30s"]


def test_heartbeat_says_it_is_still_running(capsys):
    assert heartbeat("latents", "writing", lambda: time.sleep(0.35) or 7, every_s=0.1, status=lambda: "3 files") == 7
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[latents] writing: started"
    assert any("writing: running" in line and "3 files" in line for line in lines[1:-1])
    assert lines[-1].startswith("[latents] writing: done in")


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 75, 3 * 3600 + 125)] == ["4s", "1m15s", "3h02m"]


def _metrics() -> dict:
    """A metrics.json as a DAE run with a DiT and evaluation writes it (trimmed)."""
    return {
        "run": "/runs/dae-kl4-s0", "mode": "dae", "wall_seconds": 754.2,
        "stages": {
            "stage1": {"steps": 2000, "val_mse": 0.01234, "val_psnr": 25.1, "val_ssim": 0.812, "wall_seconds": 301.0},
            "stage2": {"steps": 2000, "val_mse": 0.00811, "val_psnr": 27.3, "val_ssim": 0.871, "wall_seconds": 288.5},
        },
        "generator": {"kind": "dit", "model": "DiT-T/2", "steps": 3000, "loss": 0.4321, "wall_seconds": 120.0},
        "parameters": {"encoder": 1000, "decoder": 2000},
        "eval": {"headline": "fd_shapesclf", "wall_seconds": 45.0,
                 "samples": {"fd_shapesclf": 12.5, "num": 500},
                 "real_vs_real": {"fd_shapesclf": 1.25},
                 "reconstruction": {"decoder": {"fd_shapesclf": 3.5, "mse": 0.008},
                                    "aux_decoder": {"fd_shapesclf": 6.0}}},
    }


def test_run_summary_is_short_and_names_what_matters():
    text = run_summary(_metrics())
    lines = text.splitlines()
    assert len(lines) <= 14, text
    assert "{" not in text  # not metrics.json again
    stage1 = next(line for line in lines if line.lstrip().startswith("stage1"))
    for needle in ("0.01234", "25.10", "0.812", "5m01s"):
        assert needle in stage1
    assert any("stage2" in line and "0.00811" in line and "27.30" in line for line in lines)
    generator = next(line for line in lines if "generator" in line)
    assert "dit" in generator and "0.4321" in generator and "2m00s" in generator
    samples = next(line for line in lines if "fd_shapesclf" in line)
    assert "12.5" in samples and "1.25" in samples and "3.5" in samples  # samples, floor, reconstructions
    assert "/runs/dae-kl4-s0/metrics.json" in text and "/runs/dae-kl4-s0/samples.png" in text
    assert "tensorboard --logdir /runs/dae-kl4-s0" in text


def test_run_summary_says_when_a_conditional_generator_ignores_its_labels():
    metrics = _metrics()
    metrics["generator"]["label_gain"] = 0.00003
    ignored = next(line for line in run_summary(metrics).splitlines() if "wrong labels" in line)
    assert "0.0000" in ignored and "ignores its class labels" in ignored
    metrics["generator"]["label_gain"] = 0.05
    used = next(line for line in run_summary(metrics).splitlines() if "wrong labels" in line)
    assert "0.0500" in used and "ignores" not in used
    del metrics["generator"]["label_gain"]  # an unconditional generator has no such line
    assert "wrong labels" not in run_summary(metrics)


def test_run_summary_without_generator_or_eval():
    metrics = _metrics()
    del metrics["generator"], metrics["eval"]
    metrics["stages"]["stage2"]["val_ssim"] = None  # a missing number is shown as such, not a crash
    text = run_summary(metrics)
    assert "generator" not in text and "samples.png" not in text
    assert "n/a" in text
    assert "eval" in text  # says evaluation did not run and how to run it
    metrics["stages"]["stage1"]["val_psnr"] = math.nan
    assert "n/a" in run_summary(metrics)


def test_rays_own_harmless_worker_lines_are_dropped_and_everything_else_printed():
    cleaner = {"actor_name": "PlacementGroupCleaner", "is_err": True,
               "lines": ["Traceback (most recent call last):", "ray.exceptions.RpcError: Timed out"]}
    progress_bars = {"actor_name": "SplitCoordinator", "is_err": True,
                     "lines": ["Progress bars disabled. To enable, set ..."]}
    step = {"actor_name": "RayTrainWorker", "is_err": False, "lines": ["[stage1] step 100/500  loss 0.36"]}
    mixed = {"actor_name": "RayTrainWorker", "is_err": True,
             "lines": ["Progress bars disabled. To enable, set ...", "ValueError: a real error",
                       "Reporting training result 1: TrainingReport(...)"]}
    # The controller's notice that the cleaner did not stop in time, its traceback split over two batches.
    controller = {"actor_name": "TrainController", "pid": 7, "is_err": True,
                  "lines": ["Failed to stop PlacementGroupCleaner gracefully.", "Traceback (most recent call last):",
                            '  File "placement_group_callback.py", line 126, in _stop_cleaner']}
    controller_rest = {"actor_name": "TrainController", "pid": 7, "is_err": True,
                       "lines": ["           ^^^^^^^^^^^", "ray.exceptions.GetTimeoutError: Get timed out",
                                 "ValueError: the next real error"]}
    unregistered = {"actor_name": "TrainController", "pid": 8, "is_err": True,
                    "lines": ["Failed to register placement group with cleaner: The actor died unexpectedly.",
                              "\tclass_name: PlacementGroupCleaner", "\tpid: 25902",
                              "The actor is dead because its worker process has died."]}
    # A finished Tune trial's actor, stopped by SIGTERM inside a WeakSet callback (Ray's handler raises SystemExit).
    stopped_trial = {"actor_name": "run_trial", "pid": 9, "is_err": True,
                     "lines": ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f4a3836e480>",
                               "Traceback (most recent call last):",
                               '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
                               "    def _remove(item, selfref=ref(self)):", "",
                               '  File "ray/_private/worker.py", line 1063, in sigterm_handler',
                               "    raise_sys_exit_with_custom_error_message(", "SystemExit: 1",
                               "[generator] a line of its own"]}
    # The same process's stdout, between two batches of its stderr traceback: neither ends nor joins it.
    controller_stdout = {"actor_name": "TrainController", "pid": 7, "is_err": False, "lines": ["[stage1] done"]}
    # A harmless message of one line: the next unindented line is not part of it.
    one_line = {"actor_name": "TrainController", "pid": 10, "is_err": True,
                "lines": ["Failed to register placement group with cleaner: timed out.", "ValueError: kept"]}
    printed = []
    print_worker_lines = _filtered(printed.append)
    for batch in (cleaner, progress_bars, step, mixed, controller, controller_stdout, controller_rest, unregistered,
                  stopped_trial, one_line):
        print_worker_lines(batch)
    assert printed == [step, {**mixed, "lines": ["ValueError: a real error"]}, controller_stdout,
                       {**controller_rest, "lines": ["ValueError: the next real error"]},
                       {**stopped_trial, "lines": ["[generator] a line of its own"]},
                       {**one_line, "lines": ["ValueError: kept"]}]
    assert _filtered(print_worker_lines) is print_worker_lines  # wrapped once, however often Ray is connected


def test_two_trials_progress_lines_are_not_folded_into_one_by_rays_deduplication():
    def lines_printed(allow_re):
        dedup = LogDeduplicator(5, allow_re, None, _timesource=lambda: 0.0)
        printed = []
        for pid, images_per_second in ((101, 1044), (202, 947)):  # two trials' workers, the same step
            batch = {"ip": "node", "pid": pid, "lines": [f"[stage1] step 200/300  loss 0.35  {images_per_second} img/s"]}
            for out in dedup.deduplicate(batch):
                printed += out["lines"]
        return printed

    assert len(lines_printed(None)) == 1  # Ray's default: the second trial's line is folded away
    assert len(lines_printed(QUIET_RAY_ENV["RAY_DEDUP_LOGS_ALLOW_REGEX"])) == 2


@pytest.mark.ray
def test_evaluation_tasks_say_when_they_start_end_and_what_still_runs(ray_session, monkeypatch, capsys):
    def _slow_square(x, pause, *, use_gpu):  # local, so Ray pickles it by value (workers cannot import tests/)
        time.sleep(pause)
        return x * x

    monkeypatch.setattr(scoring, "EVERY_S", 0.2)
    jobs = {"fast": (_slow_square, 2, 0.0), "slow": (_slow_square, 3, 1.5)}
    results = scoring.run_bounded(jobs, 2, {"num_cpus": 0.01}, {"slow": "drawing samples 0-9 of 10"}, use_gpu=False)
    assert results == {"fast": 4, "slow": 9}
    lines = capsys.readouterr().out.splitlines()
    assert "[eval] started drawing samples 0-9 of 10" in lines and "[eval] started fast" in lines
    assert any(line.startswith("[eval] evaluation tasks: 1/2 done (50%)") and "running: drawing samples 0-9 of 10 ("
               in line for line in lines), lines
    assert lines[-1].startswith("[eval] finished drawing samples 0-9 of 10 in") and "2/2 done (100%)" in lines[-1]
