"""raydae.stats.asha_replay decides like Ray Tune's ASHA on the same reports (checked against Tune's own class)."""

from __future__ import annotations

import random

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from raydae.stats import asha_replay


def _tune_decisions(reports, grace, rf, max_t):
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)

    class Trial:  # the only attribute _Bracket reads
        def __init__(self, trial_id):
            self.trial_id = trial_id

    stopped = {}
    for trial, time, value in reports:
        stopped.setdefault(trial, None)
        if stopped[trial] is not None:
            continue
        if time >= max_t:  # AsyncHyperBandScheduler stops a finished trial and records it on completion
            bracket.on_result(Trial(trial), time, -value)
            continue
        if bracket.on_result(Trial(trial), time, -value) == "STOP":
            stopped[trial] = time
    return stopped


def test_a_hand_worked_case():
    # grace 1, rf 2, max_t 4: rungs 1, 2, 4. b is worse than a at rung 1 -> stopped; c better -> runs on.
    reports = [("a", 1, 5.0), ("b", 1, 7.0), ("c", 1, 3.0), ("a", 2, 4.0), ("c", 2, 2.0), ("a", 4, 3.5),
               ("c", 4, 1.0), ("b", 2, 0.1)]
    assert asha_replay(reports, 1, 2, 4) == {"a": None, "b": 1, "c": None}


@pytest.mark.parametrize("seed", range(5))
def test_matches_tunes_bracket_on_random_reports(seed):
    rng = random.Random(seed)
    trials = [f"t{i}" for i in range(9)]
    reports = [(trial, time, rng.uniform(0, 100)) for time in (100, 200, 300, 400) for trial in trials]
    rng.shuffle(reports)
    reports.sort(key=lambda r: r[1])  # arrival order: interleaved within a step, steps in order
    assert asha_replay(reports, 100, 2, 400) == _tune_decisions(reports, 100, 2, 400)
    assert any(v is not None for v in asha_replay(reports, 100, 2, 400).values())
