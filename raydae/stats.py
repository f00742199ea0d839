"""Rank correlation over runs: Spearman's ρ with a bootstrap 95% interval. numpy only (no torch, no Ray).

Used by `raydae report` to ask whether a cheap measure of a latent ranks runs like their final sample
distance. Ties get average ranks; the interval resamples runs with replacement (percentile bootstrap,
fixed seed, so a report is reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
MIN_RUNS = 4  # below this a rank correlation says nothing (ρ over 3 points takes only 4 values)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (e.g. [10, 20, 20] -> [1, 2.5, 2.5])."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan  # a constant side has no ranking


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks. NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return math.nan
    return _pearson(average_ranks(x), average_ranks(y))


def spearman_bootstrap(x: Sequence[float], y: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0, level: float = 0.95) -> dict:
    """{"rho", "low", "high", "n"}: ρ and the percentile bootstrap interval over runs (pairs resampled together).

    Resamples in which one side is constant have no ρ and are left out of the percentiles; low and high
    are NaN when no resample has one.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho = spearman(x, y)
    n = len(x)
    if n < 2:
        return {"rho": rho, "low": math.nan, "high": math.nan, "n": n}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    rhos = np.array([spearman(x[pick], y[pick]) for pick in picks])
    rhos = rhos[np.isfinite(rhos)]
    if not rhos.size:
        return {"rho": rho, "low": math.nan, "high": math.nan, "n": n}
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(rhos, [tail, 100 - tail])
    return {"rho": rho, "low": float(low), "high": float(high), "n": n}


def asha_replay(reports: Sequence[tuple[str, float, float]], grace_period: float, reduction_factor: float,
                max_t: float, mode: str = "min") -> dict[str, float | None]:
    """What Ray Tune's ASHA (one bracket) would have stopped, given trials' reports in arrival order.

    reports: (trial, time, value) as they arrived, e.g. from a FIFO sweep where every trial ran to the end.
    Returns trial -> the time at which ASHA would stop it, or None when it would run to the end. Mirrors
    AsyncHyperBandScheduler: rungs at grace * rf**k <= max_t; a trial reaching a rung is stopped when its
    value is worse than the (1 - 1/rf) quantile of the values recorded there before it; a stopped trial's
    later reports are dropped. (Replayed on FIFO timings, trials arrive as they did there, not as they
    would have with compute freed by stopping; the decisions are the rule's, the order is FIFO's.)"""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}")
    sign = -1.0 if mode == "min" else 1.0  # Tune keeps "higher is better" internally
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    rungs = [(grace_period * reduction_factor ** k, {}) for k in reversed(range(count))]
    stopped: dict[str, float | None] = {}
    for trial, time, value in reports:
        stopped.setdefault(trial, None)
        if stopped[trial] is not None or value is None or not math.isfinite(value):
            continue
        reward = sign * value
        for milestone, recorded in rungs:
            if time < milestone:
                continue
            if trial in recorded:
                break  # the decision at this rung was made when the trial first reached it
            if time < max_t and recorded and reward < np.nanpercentile(
                    list(recorded.values()), (1 - 1 / reduction_factor) * 100):
                stopped[trial] = time
            recorded[trial] = reward
            break
    return stopped
