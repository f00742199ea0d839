"""The DAE study's statistics: arms over paired seeds, per metric, against a baseline arm.

A study is a sweep file with a `study:` section (see studies/). Its trials are arms x seeds (x any other
grid); `train.seed` is the pairing: arm A and arm B with seed s share data order, initialisation and
sampling noise, so the comparison is on per-seed differences (docs/architecture.md, "A study compares
arms honestly"). This module only does arithmetic on finished runs' metrics; it imports neither Ray nor torch.

For each metric and arm: mean, sample standard deviation over seeds (the seed spread) and n. Against the
baseline, on the seeds both arms finished: the mean paired difference (arm - baseline), its standard
deviation and standard error, the paired t statistic and a two-sided 95% confidence interval
(Student's t); the same for any other pair of arms the file names (`pairs:`). Two verdicts, both printed:
  exceeds_spread  |mean difference| is larger than the larger of the two arms' seed spreads
  significant     the 95% interval of the paired difference excludes 0
A stage-1 run whose final reconstruction error is far above its seed-mates' is flagged, not dropped.
"""

from __future__ import annotations

import math

from raydae.errors import UserError
from raydae.metrics_json import metric_value

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables); 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]

DEFAULT_METRICS = [
    "eval.samples.fd_shapesclf",  # samples vs real images: what a user sees
    "eval.reconstruction.decoder.fd_shapesclf",  # the decoder's share
    "eval.samples_vs_reconstructions.fd_shapesclf",  # the generator's own error given its decoder
    "eval.reconstruction.decoder.mse",
]
STAGE1_HEALTH = "stages.stage1.val_mse"  # the auxiliary decoder's reconstruction error at the end of stage 1
STAGE1_OUTLIER_RATIO = 1.5  # flagged when above this multiple of the median of its seed-mates


def t_quantile_975(df: int) -> float:
    """Student's t 97.5 % quantile: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    (Abramowitz & Stegun 26.7.5; within 1e-4 of the exact value from df 30 on)."""
    if 1 <= df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def spread(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd}


def paired_difference(arm: dict[int, float], baseline: dict[int, float]) -> dict:
    """arm - baseline on the seeds both have: mean, sd, stderr, t, 95% interval and the two verdicts."""
    seeds = sorted(set(arm) & set(baseline))
    diffs = [arm[s] - baseline[s] for s in seeds]
    out = {"seeds": seeds, **{f"diff_{k}": v for k, v in spread(diffs).items()}}
    n, mean, sd = out["diff_n"], out["diff_mean"], out["diff_sd"]
    if n < 2:
        out.update(stderr=math.nan, t=math.nan, ci95=[math.nan, math.nan], exceeds_spread=None, significant=None)
        return out
    stderr = sd / math.sqrt(n)
    half = t_quantile_975(n - 1) * stderr
    larger_spread = max(spread([arm[s] for s in seeds])["sd"], spread([baseline[s] for s in seeds])["sd"])
    out.update(
        stderr=stderr,
        t=mean / stderr if stderr > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean)),
        ci95=[mean - half, mean + half],
        exceeds_spread=abs(mean) > larger_spread,
        significant=(mean - half > 0) or (mean + half < 0),
    )
    return out


def stage1_outliers(values: dict[int, float]) -> list[int]:
    """Seeds whose stage-1 error is over STAGE1_OUTLIER_RATIO x the median of the other seeds'."""
    flagged = []
    for seed, value in values.items():
        others = sorted(v for s, v in values.items() if s != seed)
        if not others:
            continue
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        if value > STAGE1_OUTLIER_RATIO * median:
            flagged.append(seed)
    return sorted(flagged)


def compare(runs: list[dict], arms: list[str], baseline: str, metrics: list[str],
            pairs: list[list[str]] = ()) -> list[dict]:
    """`runs`: {"arm", "seed", "group" (other grid values, a string), "metrics"} per finished run.

    Returns one block per group: per arm and metric the spread, per non-baseline arm the paired difference,
    and per `[arm, reference]` of `pairs` the paired difference arm - reference."""
    if baseline not in arms:
        raise UserError(f"study: baseline {baseline!r} is not one of the arms ({', '.join(arms)})")
    blocks = []
    for group in sorted({r["group"] for r in runs}):
        members = [r for r in runs if r["group"] == group]
        block = {"group": group, "arms": {}}
        for arm in arms:
            mine = [r for r in members if r["arm"] == arm]
            entry = {"seeds": sorted(r["seed"] for r in mine), "metrics": {}, "differences": {}}
            health = {r["seed"]: metric_value(r["metrics"], STAGE1_HEALTH) for r in mine}
            entry["stage1_outliers"] = stage1_outliers({s: v for s, v in health.items() if v is not None})
            for metric in metrics:
                values = {r["seed"]: metric_value(r["metrics"], metric) for r in mine}
                values = {s: v for s, v in values.items() if v is not None}
                # a finished run without a finite value (a diverged seed's NaN) is named, not silently dropped
                entry["metrics"][metric] = {**spread(list(values.values())), "values": values,
                                            "no_value": sorted(set(entry["seeds"]) - set(values))}
                if arm != baseline:
                    base = {r["seed"]: metric_value(r["metrics"], metric) for r in members if r["arm"] == baseline}
                    entry["differences"][metric] = paired_difference(values, {s: v for s, v in base.items()
                                                                              if v is not None})
            block["arms"][arm] = entry
        block["pairs"] = [
            {"arm": arm, "reference": reference, "differences": {
                metric: paired_difference(block["arms"][arm]["metrics"][metric]["values"],
                                          block["arms"][reference]["metrics"][metric]["values"])
                for metric in metrics}}
            for arm, reference in pairs]
        blocks.append(block)
    return blocks


def _seeds_cell(m: dict, d: dict | None) -> str:
    """Seeds in the mean, and where they differ, the finished runs without a value and the seeds paired."""
    cell = str(m["n"])
    if m.get("no_value"):
        cell += f" (no value: seed {', '.join(map(str, m['no_value']))})"
    if d is not None and d["diff_n"] != m["n"]:
        cell += f"; {d['diff_n']} paired"
    return cell


def _difference_cells(d: dict) -> list[str]:
    return [f"{_fmt(d['diff_mean'])} ± {_fmt(d['stderr'])} (stderr)",
            f"[{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}]", _fmt(d["t"], 3),
            {True: "yes", False: "no", None: "n/a"}[d["exceeds_spread"]],
            {True: "yes", False: "no", None: "n/a"}[d["significant"]]]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def markdown(blocks: list[dict], labels: dict[str, str], baseline: str, metrics: list[str],
             schedules: dict[str, dict]) -> str:
    """The study's tables: arms' settings, then per group and metric mean ± sd and the paired difference."""
    lines = ["## Arms", "", "| arm | label | AE steps (total) | final-decoder steps | final decoder | aux decoder |",
             "|---|---|---|---|---|---|"]
    for arm, row in schedules.items():
        lines.append(f"| {arm} | {labels.get(arm, '')} | {row['total_ae_steps']} | {row['final_decoder_steps']} | "
                     f"{row['final_decoder']} | {row['aux_decoder']} |")
    for block in blocks:
        pairs = block.get("pairs", [])
        lines += ["", f"## {block['group'] or 'Results'}", "",
                  f"Paired differences are arm − {baseline} on the seeds both finished"
                  + ("; rows `A − B` compare two other arms the same way (the file's `pairs:`)" if pairs else "")
                  + "; *exceeds spread*: |difference| > the larger arm's seed sd; *significant*: the 95% "
                  "interval (Student's t) excludes 0.", ""]
        for metric in metrics:
            lines += [f"**{metric}**", "", "| arm | seeds | mean ± sd | diff vs baseline | 95% interval | paired t "
                      "| exceeds spread | significant |", "|---|---|---|---|---|---|---|---|"]
            for arm, entry in block["arms"].items():
                m = entry["metrics"][metric]
                d = entry["differences"].get(metric)
                cells = ["—"] * 5 if d is None else _difference_cells(d)
                lines.append(f"| {arm} | {_seeds_cell(m, d)} | {_fmt(m['mean'])} ± {_fmt(m['sd'])} | "
                             + " | ".join(cells) + " |")
            for pair in pairs:
                d = pair["differences"][metric]
                lines.append(f"| {pair['arm']} − {pair['reference']} | {d['diff_n']} | — | "
                             + " | ".join(_difference_cells(d)) + " |")
            lines.append("")
        flagged = {arm: e["stage1_outliers"] for arm, e in block["arms"].items() if e["stage1_outliers"]}
        if flagged:
            lines.append("Stage 1 ended far above its seed-mates (kept in the tables above): " + "; ".join(
                f"{arm} seed(s) {', '.join(map(str, seeds))}" for arm, seeds in flagged.items()))
            lines.append("")
    return "\n".join(lines) + "\n"
