"""`raydae report`: turn one run folder, or a folder of runs (a sweep), into report.md plus PNG figures.

Reads only what runs leave behind (config.yaml, metrics.json, samples.png, tensorboard/), so it needs
no Ray and no GPU, and works on a sweep while some of its runs are still training.

A folder on other storage (`s3://bucket/sweeps/x`, any URI pyarrow.fs reads) is read through the same
storage layer as runs: the small files a report reads are copied to a temporary folder, the report is made
there, and report.md, report/ and tensorboard/report/ are written back beside the runs.

Output, beside the runs:
    report.md                       tables sorted by the chosen metric, figures embedded; over several
                                    runs, Spearman ρ of each latent measure (latent_quality, the
                                    latent-data distance) with that metric, also printed
    report/<figure>.png             loss_curves, quality_vs_complexity, metric_vs_latent_size,
                                    samples_side_by_side
    tensorboard/report/             the same figures as TensorBoard images (tag report/<figure>)
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on clusters and in CI, where there is no display
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from raydae.errors import UserError  # noqa: E402
from raydae.metrics_json import (  # noqa: E402
    dotted_get, flatten_numbers, is_metric_value, metric_value, sample_metric_name)
from raydae.stats import BOOTSTRAP_RESAMPLES, MIN_RUNS, asha_replay, spearman, spearman_bootstrap  # noqa: E402
from raydae.storage import delete_files, download_tree, is_uri, upload_files  # noqa: E402

# Folders a run writes inside itself; none holds another run, and checkpoint_* ones look like runs
# (config.yaml, metrics.json). Stage folders are skipped only inside a run, so a run named `joint` is found.
SKIP_FOLDERS = {"tensorboard", "latents", "report"}
STAGES = ("stage1", "stage2", "joint", "generator")  # also the panel order of the loss curves
MAX_DEPTH = 3  # a sweep's trial folders sit one or two levels below the sweep
MAX_RUNS_PER_PANEL = 12  # more lines than this are unreadable; the best runs are drawn
MAX_SAMPLE_PANELS = 6
ANNOTATE_UP_TO = 10  # name the points of a scatter only while the names do not pile up
DEFAULT_METRICS = ("fid", "fd_shapesclf", "fd_randfeat")
# Words in a metric's name that make higher better (and `is`); distances, KLs and losses are lower-is-better.
HIGHER_IS_BETTER_WORDS = ("precision", "recall", "psnr", "ssim", "accuracy")
LATENT_QUALITY = "latent_quality"  # metrics.json section of cheap latent measures (eval/latent_quality.py)
# The latent-data distance (docs/latent_distance.md): the held-out value and the paired L2.
PROXY_RHO = 0.8  # a latent measure ranking runs at least this well is worth pruning on (issue: rho >= 0.8)
PROBE_TAG = "generator/probe/fd"  # the sample probe's Fréchet distance at each generator checkpoint
ASHA_REPLAY_FACTOR = 2  # the reduction factor the replay assumes (sweeps/quick.yaml's)
LATENT_DISTANCE_MEASURES = ("eval.latent_distance.value", "eval.latent_distance.paired_l2_val")


def decoder_label(decoder: dict | None) -> str:
    """`w0.5 b1 d0`: a decoder config's width multiplier, residual blocks per level and dropout."""
    if not isinstance(decoder, dict):
        return "?"
    return (f"w{float(decoder.get('width', 1.0)):g} b{int(decoder.get('num_res_blocks', 2))} "
            f"d{float(decoder.get('dropout', 0.0)):g}")


@dataclass
class Run:
    name: str  # path relative to the report folder: what tables, legends and titles show
    folder: Path
    config: dict
    metrics: dict | None  # None: unfinished (no metrics.json yet), good for loss curves only

    @property
    def mode(self) -> str:
        mode = dotted_get(self.metrics, "mode") or dotted_get(self.config, "train.mode", "dae")
        return "joint" if mode == "joint" else "DAE"

    @property
    def latent_shape(self) -> list[int] | None:
        # metrics.json spells it latent.latent_shape (the stage signature); `shape` is accepted too.
        shape = dotted_get(self.metrics, "latent.latent_shape") or dotted_get(self.metrics, "latent.shape")
        if shape:
            return [int(n) for n in shape]
        channels = dotted_get(self.config, "ae.latent_channels")
        return [int(channels)] if channels else None

    @property
    def latent_label(self) -> str:
        bottleneck = dotted_get(self.metrics, "latent.bottleneck") or dotted_get(self.config, "ae.bottleneck", "?")
        shape, codes = self.latent_shape, dotted_get(self.metrics, "latent.codebook_size")
        return (f"{bottleneck} {'x'.join(map(str, shape))}" if shape else str(bottleneck)) + (
            f" ({codes} codes)" if codes else "")

    @property
    def latent_size(self) -> int | None:
        return math.prod(self.latent_shape) if self.latent_shape else None

    @property
    def aux_label(self) -> str:
        # A joint run trains no auxiliary decoder, whatever its config still says about one.
        return "—" if self.mode == "joint" else decoder_label(dotted_get(self.config, "ae.aux_decoder"))

    def sample_metrics(self) -> dict[str, float]:
        samples = dotted_get(self.metrics, "eval.samples", {}) or {}
        return {key: value for key, value in samples.items() if is_metric_value(value)}

    def value(self, metric: str) -> float | None:
        """A key of eval.samples (`fd_shapesclf`), or a dotted path in metrics.json (`eval.samples.fid`)."""
        return metric_value(self.metrics, metric)

    def final_reconstruction(self) -> tuple[float | None, float | None]:
        """MSE and PSNR of the decoder the generator's samples go through: eval's, else the last stage's."""
        recon = dotted_get(self.metrics, "eval.reconstruction.decoder")
        if isinstance(recon, dict):
            return recon.get("mse"), recon.get("psnr")
        for stage in ("joint", "stage2"):
            if dotted_get(self.metrics, f"stages.{stage}"):
                return (dotted_get(self.metrics, f"stages.{stage}.val_mse"),
                        dotted_get(self.metrics, f"stages.{stage}.val_psnr"))
        return None, None

    def parameters(self, part: str) -> int | None:
        return (dotted_get(self.metrics, f"eval.complexity.{part}.parameters")
                or dotted_get(self.metrics, f"parameters.{part}"))

    def decoder_flops(self) -> float | None:
        return dotted_get(self.metrics, "eval.complexity.decoder.flops_per_image")

    def samples_png(self) -> Path | None:
        png = self.folder / (dotted_get(self.metrics, "generator.samples") or "samples.png")
        return png if png.is_file() else None


# ---------------------------------------------------------------- finding and reading runs

def _read(file: Path, parse):
    try:
        return parse(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{file}: cannot read it ({type(err).__name__}: {err})") from None


def find_runs(path: str | Path) -> list[Run]:
    """Run folders at `path` or below it: finished (metrics.json) or started (config.yaml + tensorboard/)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{path}: no such folder; expected a run folder (with metrics.json) or a folder of runs")
    runs: list[Run] = []

    def visit(folder: Path, depth: int) -> None:
        finished = (folder / "metrics.json").is_file()
        if finished or ((folder / "config.yaml").is_file() and (folder / "tensorboard").is_dir()):
            config = _read(folder / "config.yaml", yaml.safe_load) if (folder / "config.yaml").is_file() else {}
            metrics = _read(folder / "metrics.json", json.loads) if finished else None
            name = folder.relative_to(root).as_posix() if folder != root else root.resolve().name
            runs.append(Run(name, folder, config or {}, metrics))
            return  # runs do not nest
        skip = SKIP_FOLDERS | (set(STAGES) if (folder / "config.yaml").is_file() else set())
        if depth < MAX_DEPTH:
            for child in sorted(folder.iterdir()):
                if (child.is_dir() and child.name not in skip and not child.name.startswith((".", "checkpoint_"))):
                    visit(child, depth + 1)

    visit(root, 0)
    if not runs:
        raise UserError(f"{path}: no runs found; expected metrics.json (or config.yaml with tensorboard/) "
                        f"in this folder or in sub-folders up to {MAX_DEPTH} levels down")
    return runs


def choose_metric(runs: list[Run], metric: str | None, mode: str | None) -> tuple[str | None, str]:
    """The metric to rank by and whether lower ('min') or higher ('max') is better; None when no run has eval."""
    if mode not in (None, "min", "max"):
        raise UserError(f"mode must be 'min' or 'max', got {mode!r}")
    available = sorted({key for run in runs for key in run.sample_metrics()})
    if metric is None:
        headlines = Counter(dotted_get(run.metrics, "eval.headline") for run in runs
                            if dotted_get(run.metrics, "eval.headline"))
        candidates = [name for name, _ in headlines.most_common()] + list(DEFAULT_METRICS)
        metric = next((name for name in candidates if name in available), None)
        if metric is None:
            if available:  # eval ran with metrics this module has no default for: ask rather than guess
                raise UserError(f"no default metric among the runs' eval.samples; pick one with --metric: "
                                f"{', '.join(available)}")
            return None, mode or "min"
    elif "." in metric:  # a dotted path in metrics.json, as sweep and study files name their metric
        if not any(run.value(metric) is not None for run in runs):
            raise UserError(f"metric {metric!r}: no run's metrics.json has a number at that path")
    elif metric not in available:
        listed = ", ".join(available) if available else "none (no run has eval.samples in metrics.json)"
        raise UserError(f"metric {metric!r} is in no run's eval.samples; available: {listed}")
    if mode is None:
        leaf = metric.rsplit(".", 1)[-1]
        mode = "max" if leaf == "is" or set(leaf.split("_")) & set(HIGHER_IS_BETTER_WORDS) else "min"
    return metric, mode


def describe_metric(runs: list[Run], metric: str, mode: str) -> str:
    """One sentence on what the metric measures and in which feature space, so no one mistakes it for FID."""
    better = "lower" if mode == "min" else "higher"
    metric = sample_metric_name(metric)
    if "." in metric:  # a path outside eval.samples (a reconstruction, a stage's loss): its name says what it is
        return f"Metric: **`{metric}`** ({better} is better)."
    features: dict = {}
    for run in runs:
        features.update(dotted_get(run.metrics, "eval.features", {}) or {})
    tokens = metric.split("_")
    kinds = {"fd": "Fréchet distance", "kd": "kernel distance (MMD²)", "precision": "precision",
             "recall": "recall", "fid": "FID (Fréchet Inception distance)", "kid": "KID (kernel Inception distance)",
             "is": "Inception Score"}
    kind = kinds.get(tokens[0], f"`{metric}`")
    feature = next((name for name in features if name in tokens[1:]), None)
    if feature is None and (tokens[0] in ("fid", "kid", "is") or "inception" in tokens):
        feature = "inception"
    against = "" if tokens[0] == "is" else " against real images"  # IS scores the samples alone
    text = f"Metric: **`{metric}`** ({better} is better), {kind} of generated samples{against}"
    if feature == "inception":
        text += f", in Inception-v3 features: {features.get('inception', 'the standard FID network')}."
    elif feature is not None:
        text += (f", in the feature space of `{feature}`: {features[feature]}. Not an Inception distance, so "
                 "compare it only with runs evaluated by the same feature network.")
    else:
        text += "."
    floors = [dotted_get(run.metrics, f"eval.real_vs_real.{metric}") for run in runs]
    floors = [value for value in floors if is_metric_value(value)]
    if floors:  # the distance between two real halves: how low this metric can sensibly go
        text += f" Real-vs-real floor: {min(floors):.4g}."
    return text


def scalar_events(board: Path) -> dict[str, list]:
    """{tag: [ScalarEvent, ...] by step} from the TensorBoard event files in one folder; where a resume wrote a
    step again, the later event counts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not board.is_dir():
        return {}
    events = EventAccumulator(str(board), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    out = {}
    for tag in events.Tags().get("scalars", []):
        by_step = {event.step: event for event in events.Scalars(tag)}
        out[tag] = [by_step[step] for step in sorted(by_step)]
    return out


def read_scalars(run: Run) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{stage: {key: (steps, values)}} from tensorboard/<stage>/ event files; tags are `<stage>/<key>`."""
    out: dict = {}
    board = run.folder / "tensorboard"
    if not board.is_dir():
        return out
    for stage_dir in sorted(board.iterdir()):
        if not stage_dir.is_dir() or stage_dir.name == "report":
            continue
        for tag, events in scalar_events(stage_dir).items():
            stage, _, key = tag.partition("/")
            out.setdefault(stage, {})[key] = ([event.step for event in events], [event.value for event in events])
    return out


# ---------------------------------------------------------------- figures

def _ordered(runs: list[Run], metric: str | None, mode: str) -> list[Run]:
    """Best first by the metric; runs without it keep their folder order at the end."""
    def key(run: Run):
        value = run.value(metric) if metric else None
        return (1, 0.0) if value is None else (0, value if mode == "min" else -value)
    return sorted(runs, key=key)


def loss_curves(runs: list[Run]) -> tuple[plt.Figure, list[str]] | None:
    scalars = {run.name: read_scalars(run) for run in runs[:MAX_RUNS_PER_PANEL]}
    present = {stage for per_run in scalars.values() for stage in per_run}
    stages = [stage for stage in STAGES if stage in present] + sorted(present - set(STAGES))
    if not stages:
        return None
    cols = min(len(stages), 4)
    rows = math.ceil(len(stages) / cols)
    # constrained layout leaves room for the shared legend below the panels
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows + 0.4), squeeze=False,
                             layout="constrained")
    colours = plt.get_cmap("tab10" if len(scalars) <= 10 else "tab20")
    for ax, stage in zip(axes.flat, stages):
        val_keys = set()
        for index, (name, per_run) in enumerate(scalars.items()):
            logged = per_run.get(stage, {})
            train_key = "loss/total" if "loss/total" in logged else next(
                (key for key in sorted(logged) if key.startswith("loss/")), None)
            if train_key:
                ax.plot(*logged[train_key], color=colours(index), linewidth=1.2)
            # Validation is logged rarely (often once, at the end): dashed with markers so one point shows.
            val_key = next((key for key in ("val/loss/total", "val/loss", "val/diffusion_loss", "val/mse")
                            if key in logged), None)
            if val_key:
                ax.plot(*logged[val_key], color=colours(index), linestyle="--", marker="o", markersize=3)
                val_keys.add(val_key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (solid)" + (f", {' / '.join(sorted(val_keys))} (dashed)" if val_keys else ""),
                      fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(stages):]:
        ax.remove()
    handles = [Line2D([], [], color=colours(i), label=name) for i, name in enumerate(scalars)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    return fig, stages


def quality_vs_complexity(runs: list[Run], metric: str, mode: str) -> tuple[plt.Figure, list[str]] | None:
    runs = [run for run in runs if run.value(metric) is not None]
    # x: decoder GFLOPs/image when every run has them; else parameters, so all points share one axis.
    if all(is_metric_value(run.decoder_flops()) for run in runs):
        label, x = "final decoder GFLOPs per image", {run.name: run.decoder_flops() / 1e9 for run in runs}
    else:
        label = "final decoder parameters (FLOPs missing)"
        x = {run.name: run.parameters("decoder") for run in runs if is_metric_value(run.parameters("decoder"))}
    runs = [run for run in runs if run.name in x]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    for mode_name, marker, colour in (("DAE", "o", "tab:blue"), ("joint", "s", "tab:orange")):
        chosen = [run for run in runs if run.mode == mode_name]
        if chosen:
            ax.scatter([x[run.name] for run in chosen], [run.value(metric) for run in chosen],
                       marker=marker, color=colour, label=mode_name, s=40)
    if len(runs) <= ANNOTATE_UP_TO:
        for run in runs:
            ax.annotate(run.name, (x[run.name], run.value(metric)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    values = list(x.values())
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")
    title = f"{metric} vs decoder cost"
    ax.set(title=title, xlabel=label, ylabel=f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, [title]


def metric_vs_latent_size(runs: list[Run], metric: str, mode: str) -> tuple[plt.Figure, list[str], list[str]] | None:
    # line -> latent size -> values (several seeds share a point)
    lines: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if run.value(metric) is None or run.latent_size is None:
            continue
        line = "joint" if run.mode == "joint" else f"aux {run.aux_label}"
        lines.setdefault(line, {}).setdefault(run.latent_size, []).append(run.value(metric))
    if not lines:
        return None
    labels = sorted(lines, key=lambda label: (label == "joint", label))  # joint last: the baseline
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    for label in labels:
        sizes = sorted(lines[label])
        means = [sum(lines[label][s]) / len(lines[label][s]) for s in sizes]
        below = [mean - min(lines[label][s]) for mean, s in zip(means, sizes)]
        above = [max(lines[label][s]) - mean for mean, s in zip(means, sizes)]
        ax.errorbar(sizes, means, yerr=[below, above], label=label, marker="s" if label == "joint" else "o",
                    linestyle="--" if label == "joint" else "-", capsize=3)
    sizes = sorted({size for points in lines.values() for size in points})
    if sizes[-1] / sizes[0] >= 4:
        ax.set_xscale("log", base=2)  # latent sizes grow by factors of 2: equal steps on the axis
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    title = f"{metric} vs latent size"
    ax.set(title=title, xlabel="latent size (channels × h × w)",
           ylabel=f"{metric} ({'lower' if mode == 'min' else 'higher'} is better; mean, min–max over seeds)")
    ax.yaxis.label.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, [title], labels


def study_figure(blocks: list[dict], metrics: list[str]) -> plt.Figure | None:
    """A study's per-seed values: one panel per metric (rows: other grid values), arms along x.

    Each seed is a point, joined across arms by a thin line (the comparison is paired by seed); the bar is
    the arm's mean ± sample sd. Values are drawn as measured, so an outlier seed stays visible.
    """
    blocks = [b for b in blocks if any(b["arms"][a]["metrics"].get(m, {}).get("n") for a in b["arms"] for m in metrics)]
    if not blocks or not metrics:
        return None
    arms = list(blocks[0]["arms"])
    fig, axes = plt.subplots(len(blocks), len(metrics), figsize=(3.3 * len(metrics), 3.4 * len(blocks)),
                             layout="constrained", squeeze=False)
    for row, block in enumerate(blocks):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            per_arm = {arm: block["arms"][arm]["metrics"].get(metric, {}) for arm in arms}
            seeds = sorted({seed for entry in per_arm.values() for seed in entry.get("values", {})})
            for seed in seeds:
                xs = [i for i, arm in enumerate(arms) if seed in per_arm[arm].get("values", {})]
                ys = [per_arm[arms[i]]["values"][seed] for i in xs]
                ax.plot(xs, ys, color="0.6", linewidth=0.8, marker="o", markersize=3.5, zorder=1)
            for i, arm in enumerate(arms):
                entry = per_arm[arm]
                if entry.get("n"):
                    ax.errorbar([i + 0.12], [entry["mean"]], yerr=[[entry["sd"] or 0]], fmt="s", color="C0",
                                capsize=4, zorder=2)
            ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(arms) - 0.5)
            ax.set_title(metric.removeprefix("eval."), fontsize=8)
            if block["group"]:
                ax.set_ylabel(block["group"], fontsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle("per seed (grey, paired across arms) and arm mean ± sd (blue)", fontsize=9)
    return fig


def samples_side_by_side(runs: list[Run], metric: str | None) -> tuple[plt.Figure, list[str]] | None:
    """Sample grids of the best runs; with both modes present the best DAE and best joint run lead."""
    runs = [run for run in runs if run.samples_png()]  # already best first
    if not runs:
        return None
    modes = {run.mode for run in runs}
    if len(modes) == 2:
        leaders = [next(run for run in runs if run.mode == "DAE"), next(run for run in runs if run.mode == "joint")]
        runs = leaders + [run for run in runs if run not in leaders]
    runs = runs[:MAX_SAMPLE_PANELS]
    from PIL import Image

    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    titles = []
    for ax, run in zip(axes.flat, runs):
        with Image.open(run.samples_png()) as image:
            ax.imshow(image.convert("RGB"), interpolation="nearest")  # pixels as generated
        title = f"{run.mode}: {run.name}" if len(modes) == 2 else run.name
        ax.set_title(title, fontsize=9)
        value = run.value(metric) if metric else None
        ax.set_xlabel(f"{metric} {value:.4g}" if value is not None else "", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        titles.append(title)
    for ax in list(axes.flat)[len(runs):]:
        ax.remove()
    return fig, titles


# ---------------------------------------------------------------- report.md

def _fmt(value) -> str:
    if not is_metric_value(value):
        return "—"
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{unit}"
        return str(int(value))
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def runs_table(runs: list[Run], metric: str | None) -> list[str]:
    header = ["run", "mode", "latent", "aux decoder", "final decoder", "seed"] + ([metric] if metric else []) + [
        "recon MSE", "recon PSNR", "decoder params", "decoder GFLOPs/image", "generator params"]
    rows = []
    for run in runs:
        mse, psnr = run.final_reconstruction()
        flops = run.decoder_flops()
        rows.append([run.name, run.mode, run.latent_label, run.aux_label,
                     decoder_label(dotted_get(run.config, "ae.decoder")),
                     str(dotted_get(run.config, "train.seed", "—"))]
                    + ([_fmt(run.value(metric))] if metric else [])
                    + [_fmt(mse), _fmt(psnr), _fmt(run.parameters("decoder")),
                       _fmt(flops / 1e9) if is_metric_value(flops) else "—", _fmt(run.parameters("generator"))])
    return _table(header, rows)


def latent_measures(runs: list[Run]) -> list[str]:
    """Dotted paths of the latent measures some run has: every number under latent_quality, then the distance."""
    keys = sorted({key for run in runs for key in flatten_numbers(dotted_get(run.metrics, LATENT_QUALITY))})
    return [f"{LATENT_QUALITY}.{key}" for key in keys] + [
        path for path in LATENT_DISTANCE_MEASURES if any(run.value(path) is not None for run in runs)]


def latent_correlations(runs: list[Run], metric: str) -> list[dict]:
    """Per latent measure: Spearman ρ with `metric` over the runs that have both, bootstrap interval, n.

    Fewer than MIN_RUNS such runs: rho, low and high are None."""
    rows = []
    for measure in latent_measures(runs):
        pairs = [(run.value(measure), run.value(metric)) for run in runs]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if len(pairs) < MIN_RUNS:
            rows.append({"measure": measure, "rho": None, "low": None, "high": None, "n": len(pairs)})
        else:
            rows.append({"measure": measure, **spearman_bootstrap(*zip(*pairs))})
    return rows


def correlation_section(rows: list[dict], metric: str, mode: str) -> list[str]:
    """The markdown table of latent_correlations, with how to read the sign."""
    direction = "larger (worse)" if mode == "min" else "larger (better)"
    lines = [f"## Latent measures vs `{metric}`", "",
             f"Spearman ρ over runs between each measure of the latent (taken before any generator trains) and "
             f"`{metric}`; ρ > 0: a larger measure went with a {direction} `{metric}`. Interval: bootstrap 95% "
             f"over runs ({BOOTSTRAP_RESAMPLES} resamples, seed 0, percentile); over few runs it is too narrow "
             f"(five runs in perfect order give [1, 1]), so read it as optimistic under about ten runs. Runs "
             f"without a measure are left out of its row; under {MIN_RUNS} runs no ρ is given.", ""]
    table = []
    for row in rows:
        if row["rho"] is None:
            cells = [f"fewer than {MIN_RUNS} runs", "—"]
        else:
            cells = [_fmt(row["rho"]), f"[{_fmt(row['low'])}, {_fmt(row['high'])}]"]
        table.append([f"`{row['measure']}`", str(row["n"]), *cells])
    return lines + _table(["measure", "runs", "Spearman ρ", "95% interval"], table)


def write_markdown(root: Path, runs: list[Run], metric: str | None, mode: str, figures: dict,
                   correlations: list[str] = (), shown: str | None = None) -> Path:
    """report.md in `root`; `shown` is how the folder is named in it (default: `root`)."""
    finished = [run for run in runs if run.metrics is not None]
    unfinished = [run for run in runs if run.metrics is None]
    lines = [f"# raydae report: {root.resolve().name}", "",
             f"{len(runs)} run(s) under `{shown or root}`, {len(finished)} finished.", ""]
    if metric:
        lines += [describe_metric(finished, metric, mode), ""]
    else:
        lines += ["No run has an `eval` section in metrics.json, so runs are not ranked by sample quality.", ""]
    if len(finished) == 1 and len(runs) == 1:
        run = finished[0]
        config = run.config
        lines += ["## Config", "", *_table(["field", "value"], [
            ["mode", run.mode], ["latent", run.latent_label], ["aux decoder", run.aux_label],
            ["final decoder", decoder_label(dotted_get(config, "ae.decoder"))],
            ["generator", str(dotted_get(config, "generator", dotted_get(run.metrics, "generator.kind", "—")))],
            ["image size", str(dotted_get(config, "data.image_size", "—"))],
            ["seed", str(dotted_get(config, "train.seed", "—"))]])]
    if finished:
        lines += ["## Runs" + (f" (best `{metric}` first)" if metric else ""), "", *runs_table(finished, metric)]
    if len(finished) == 1:
        metrics = flatten_numbers(finished[0].metrics)
        lines += ["## All metrics", "", *_table(["metric", "value"], [[k, _fmt(v)] for k, v in metrics.items()])]
    elif metric:
        others = sorted({key for run in finished for key in run.sample_metrics()} - {sample_metric_name(metric)})
        if others:
            lines += ["## Other sample metrics", "", *_table(
                ["run", *others], [[run.name, *(_fmt(run.value(key)) for key in others)] for run in finished])]
    if unfinished:
        lines += ["Unfinished (no metrics.json yet; loss curves only): "
                  + ", ".join(f"`{run.name}`" for run in unfinished), ""]
    lines += list(correlations)
    if len(runs) > MAX_RUNS_PER_PANEL:
        lines += [f"Loss curves show the {MAX_RUNS_PER_PANEL} best-ranked runs of {len(runs)}.", ""]
    lines += ["## Figures", ""]
    for name, figure in figures.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}](report/{Path(figure['path']).name})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    return report


def probe_events(run: Run) -> list[tuple[float, int, float]]:
    """(wall time, generator step, probe distance) of each sample probe the run logged, by step."""
    events = scalar_events(run.folder / "tensorboard" / "generator").get(PROBE_TAG, [])
    return [(event.wall_time, event.step, event.value) for event in events]


def asha_agreement(runs: list[Run], metric: str, mode: str) -> list[str]:
    """For runs that all ran to the end (FIFO): what ASHA on the sample probe would have stopped, replayed on
    their probes in the order they arrived, against the final ranking by `metric`. Empty when not applicable."""
    probes = {run.name: probe_events(run) for run in runs if run.value(metric) is not None}
    probes = {name: events for name, events in probes.items() if len(events) >= 2}
    last_steps = {events[-1][1] for events in probes.values()}
    if len(probes) < MIN_RUNS or len(last_steps) != 1:
        return []  # too few runs, or some were stopped early (an ASHA sweep: nothing to replay)
    grace, max_t = min(events[0][1] for events in probes.values()), last_steps.pop()
    arrivals = sorted((wall, name, step, value) for name, events in probes.items() for wall, step, value in events)
    stopped = asha_replay([(name, step, value) for _, name, step, value in arrivals], grace, ASHA_REPLAY_FACTOR,
                          max_t, mode="min")
    final = {run.name: run.value(metric) for run in runs if run.name in probes}
    order = sorted(final, key=final.get, reverse=(mode == "max"))
    rank = {name: position + 1 for position, name in enumerate(order)}
    first_rung = {name: events[0][2] for name, events in probes.items()}
    halted = [name for name in order if stopped[name] is not None]
    worse_half = [name for name in halted if rank[name] > len(order) / 2]
    rho = spearman([first_rung[name] for name in order], [final[name] for name in order])
    lines = ["## ASHA replayed on these runs", "",
             f"Every run here ran to the end. Replaying ASHA (the sample probe, grace period {grace} generator steps, "
             f"reduction factor {ASHA_REPLAY_FACTOR}, max_t {max_t}) on their probes in the order they arrived, it "
             f"would stop {len(halted)} of {len(order)} runs; {len(worse_half)} of those rank in the worse half by the "
             f"final `{metric}`, and the final best run would {'be stopped' if order[0] in halted else 'survive'}. "
             f"Spearman ρ between the probe at step {grace} and the final `{metric}`: {_fmt(rho)}.", ""]
    rows = [[f"`{name}`", _fmt(first_rung[name]), str(stopped[name]) if stopped[name] is not None else "runs on",
             _fmt(final[name]), str(rank[name])] for name in order]
    return lines + _table(["run", f"probe at step {grace}", "ASHA would stop at", f"final `{metric}`", "final rank"],
                          rows)


def proxy_pruning(runs: list[Run], metric: str, mode: str, correlations: list[dict]) -> list[str]:
    """For each latent measure with |rho| >= PROXY_RHO: had the worse half of these runs (by that measure, taken
    before any generator trained) been stopped there, which would survive and how much compute it would save
    (their generator and evaluation seconds, against the whole sweep's). Empty when no measure qualifies."""
    lines = []
    for row in correlations:
        if row["rho"] is None or abs(row["rho"]) < PROXY_RHO:
            continue
        measure = row["measure"]
        scored = [run for run in runs if run.value(measure) is not None and run.value(metric) is not None]
        # rho > 0: a smaller measure went with a better metric when lower is better; flip for the other cases.
        by_measure = sorted(scored, key=lambda run: run.value(measure), reverse=(row["rho"] < 0) != (mode == "max"))
        kept, pruned = by_measure[: (len(scored) + 1) // 2], by_measure[(len(scored) + 1) // 2:]
        final = sorted(scored, key=lambda run: run.value(metric), reverse=(mode == "max"))
        top_half = {run.name for run in final[: (len(final) + 1) // 2]}
        saved = sum((run.value("generator.wall_seconds") or 0) + (run.value("eval.wall_seconds") or 0)
                    for run in pruned)
        total = sum(dotted_get(run.metrics, "wall_seconds") or 0 for run in scored)  # a bare name means eval.samples
        if not lines:
            lines = ["## Pruning on a latent measure, replayed", "",
                     f"For each measure with |Spearman ρ| ≥ {PROXY_RHO} above: the runs in the worse half by that "
                     "measure, stopped right after the autoencoder stages, before any generator trains.", ""]
        lines.append(
            f"- `{measure}` (ρ {_fmt(row['rho'])}): keeps {len(kept)} of {len(scored)}; "
            f"{len([run for run in kept if run.name in top_half])} of the final top half by `{metric}` survive; the "
            f"final best {'survives' if final[0] in kept else 'is stopped'}; saves {_fmt(saved)} s of generator and "
            f"evaluation time, {_fmt(100 * saved / total) if total else '—'}% of the sweep's {_fmt(total)} s.")
    return lines + ([""] if lines else [])


# ---------------------------------------------------------------- entry point

def write_report(path: str, metric: str | None = None, mode: str | None = None, tensorboard: bool = True) -> dict:
    """path: a run folder, or a folder holding run folders (any depth up to 3, e.g. a sweep's trial folders),
    on local disk or given by URI (s3://..., read and written through pyarrow.fs as runs are).

    Writes <path>/report.md and PNG figures in <path>/report/ (and, with tensorboard=True, the same figures
    under <path>/tensorboard/report/). Returns {"report": md path, "figures": {name: {"path", "panels",
    ["lines"]}}, "runs": number of runs found, "metric": metric ranked by (None without eval), "mode",
    "latent_correlations": [{"measure", "rho", "low", "high", "n"}] (empty for one run or no latent measures)}.
    """
    if is_uri(path):
        return _write_remote_report(path, metric, mode, tensorboard)
    return _write_report(Path(path), metric, mode, tensorboard)


def _report_input(rel: str) -> bool:
    """The files of a folder of runs that a report reads (not checkpoints, latents or caches)."""
    parts = rel.split("/")
    if any(part.startswith((".", "checkpoint_")) or part in ("latents", "eval_cache") for part in parts[:-1]):
        return False
    if "tensorboard" in parts[:-1]:
        return "report" not in parts[parts.index("tensorboard") + 1:-1]
    return parts[-1] in ("config.yaml", "metrics.json", "samples.png") and len(parts) <= MAX_DEPTH + 1


def _write_remote_report(uri: str, metric: str | None, mode: str | None, tensorboard: bool) -> dict:
    """The report of a folder on other storage: made in a local copy of what it reads, written back beside it."""
    uri = uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="raydae-report-") as tmp:
        local = Path(tmp, uri.rsplit("/", 1)[-1] or "runs")
        try:
            download_tree(uri, str(local), _report_input)
        except OSError as err:
            raise UserError(f"{uri}: cannot read it ({type(err).__name__}: {' '.join(str(err).split())}); expected "
                            "a run folder or a folder of runs") from None
        try:
            result = _write_report(local, metric, mode, tensorboard, shown=uri)
        except UserError as err:
            raise UserError(str(err).replace(str(local), uri)) from None
        written = [p.relative_to(local).as_posix() for folder in ("report", "tensorboard/report")
                   if (local / folder).is_dir() for p in sorted((local / folder).iterdir()) if p.is_file()]
        upload_files(str(local), ["report.md", *written], uri)
        # One event file per report, as locally: older ones would show stale figures beside the new ones.
        fresh = {Path(rel).name for rel in written if rel.startswith("tensorboard/")}
        delete_files(uri, "tensorboard/report", keep=lambda name: name in fresh)

    def remote(local_path: str) -> str:
        return uri + "/" + Path(local_path).relative_to(local).as_posix()

    result["report"] = remote(result["report"])
    for figure in result["figures"].values():
        figure["path"] = remote(figure["path"])
    return result


def _write_report(root: Path, metric: str | None, mode: str | None, tensorboard: bool,
                  shown: str | None = None) -> dict:
    runs = find_runs(root)
    finished = [run for run in runs if run.metrics is not None]
    metric, mode = choose_metric(finished, metric, mode)
    ordered = _ordered(finished, metric, mode) + [run for run in runs if run.metrics is None]

    figure_dir = root / "report"
    figure_dir.mkdir(exist_ok=True)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        board = root / "tensorboard" / "report"
        # One event file per report: older ones would show stale figures beside the new ones.
        for old in board.glob("events.out.tfevents.*"):
            old.unlink()
        writer = SummaryWriter(str(board))

    drawn = {"loss_curves": loss_curves(ordered)}
    if metric:
        drawn["quality_vs_complexity"] = quality_vs_complexity(finished, metric, mode)
        drawn["metric_vs_latent_size"] = metric_vs_latent_size(finished, metric, mode)
    drawn["samples_side_by_side"] = samples_side_by_side(ordered, metric)

    figures: dict = {}
    for name, result in drawn.items():
        if result is None:  # nothing to draw for these runs (no scalars, no samples, no metric)
            continue
        fig, panels, *lines = result
        png = figure_dir / f"{name}.png"
        fig.savefig(png, dpi=110)
        if writer is not None:
            writer.add_figure(f"report/{name}", fig, global_step=0, close=False)
        plt.close(fig)
        figures[name] = {"path": str(png), "panels": panels, **({"lines": lines[0]} if lines else {})}
    if writer is not None:
        writer.close()

    correlations = latent_correlations(finished, metric) if metric and len(finished) > 1 else []
    section = correlation_section(correlations, metric, mode) if correlations else []
    if metric and len(finished) > 1:
        section += proxy_pruning(finished, metric, mode, correlations) + asha_agreement(finished, metric, mode)
    if section:
        print("\n".join(section), flush=True)
    report = write_markdown(root, ordered, metric, mode, figures, section, shown=shown)
    return {"report": str(report), "figures": figures, "runs": len(runs), "metric": metric, "mode": mode,
            "latent_correlations": correlations}
