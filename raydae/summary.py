"""The few lines `raydae run` prints at its end, read from the run's metrics.json (which holds the rest)."""

from __future__ import annotations

import math

from raydae.progress import format_seconds

# The generator's held-out loss under the name its task reports (DiT: diffusion loss, prior: cross-entropy).
GENERATOR_LOSSES = ("diffusion_loss", "cross_entropy", "loss")
DECODER_OF_STAGE = {"stage1": "aux decoder", "stage2": "decoder", "joint": "decoder"}


def _number(value, digits: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return format(value, digits)


def _seconds(value) -> str:
    return format_seconds(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def run_summary(metrics: dict) -> str:
    """Each stage's held-out MSE/PSNR/SSIM and time, the generator's held-out loss, the headline sample
    distance beside its real-vs-real floor and the reconstructions' distance, and where the files are."""
    run = str(metrics.get("run", "")).rstrip("/")
    lines = [f"run summary ({run}, {metrics.get('mode', '?')}, {_seconds(metrics.get('wall_seconds'))} in all)"]
    for stage, m in metrics.get("stages", {}).items():
        lines.append(f"  {stage:9s} {DECODER_OF_STAGE.get(stage, ''):12s} held-out mse {_number(m.get('val_mse'), '.5f')}"
                     f"  psnr {_number(m.get('val_psnr'), '.2f')}  ssim {_number(m.get('val_ssim'), '.3f')}"
                     f"  ({m.get('steps', '?')} steps, {_seconds(m.get('wall_seconds'))})")
    generator = metrics.get("generator")
    if generator:
        name = next((key for key in GENERATOR_LOSSES if key in generator), "loss")
        lines.append(f"  generator {generator.get('kind', '?')} {generator.get('model', '')}: held-out "
                     f"{name.replace('_', ' ')} {_number(generator.get(name), '.4f')}  ({generator.get('steps', '?')} "
                     f"steps, {_seconds(generator.get('wall_seconds'))})")
        if "label_gain" in generator:
            lines.append(_label_line(generator["label_gain"], generator.get(name)))
    evaluation = metrics.get("eval")
    if evaluation:
        headline = evaluation.get("headline", "")
        floor = evaluation.get("real_vs_real", {}).get(headline)
        recon = evaluation.get("reconstruction", {}).get("decoder", {}).get(headline)
        if "samples" in evaluation:
            lines.append(f"  samples   {headline} {_number(evaluation['samples'].get(headline), '.4g')}  (real vs real "
                         f"floor {_number(floor, '.4g')}, reconstructions {_number(recon, '.4g')}; lower is better)")
        else:
            lines.append(f"  reconstructions {headline} {_number(recon, '.4g')}  (real vs real floor "
                         f"{_number(floor, '.4g')}; no generator, no samples)")
    else:
        lines.append(f"  eval      not run (eval.enabled=false); score the run later with `raydae eval {run}`")
    lines.append(f"  files     {run}/metrics.json (every number), {run}/config.yaml")
    if generator:
        lines.append(f"  grid      {run}/samples.png  (more: raydae sample {run} --n 64 --out grid.png)")
    lines.append(f"  curves    tensorboard --logdir {run}")
    return "\n".join(lines)


def _label_line(gain, loss) -> str:
    """How much a class-conditional generator uses its labels (tasks.generators: GeneratorTask.wrong_labels)."""
    text = f"  labels    wrong labels add {_number(gain, '.4f')} to that loss"
    if isinstance(gain, (int, float)) and isinstance(loss, (int, float)) and gain < 0.01 * loss:
        text += " (under 1 %: the generator ignores its class labels; asking for a class changes little)"
    return text
