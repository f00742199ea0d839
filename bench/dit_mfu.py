"""DiT generator step: model FLOPs utilisation (MFU) on a GPU against its bf16 dense peak.

    python bench/dit_mfu.py [--preset shapes] [--model DiT-B/2] [--latent-size 32] [--batch-size 256]
                            [--steps 30] [--device cuda] [--precision bf16] [--peak-tflops 989] [--out FILE]

Runs DiTTask.train_step (the generator stage's step: diffusion loss, backward, AdamW, EMA update) on
random latents held on the device, with the autocast train_worker uses for train.precision. FLOPs per step
come from torch.utils.flop_counter.FlopCounterMode over one step (matrix products, convolutions and
attention, forward and backward); MFU = FLOPs per step x steps per second / peak. The peak defaults to
the bf16 dense figure of the detected GPU (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756, A100: 312);
--peak-tflops overrides it. On a CPU, MFU is skipped (no meaningful peak); step time and the achieved
FLOP rate are still printed. Ray plays no part here: this measures the model step alone.

The shapes preset's DiT-T/2 on 4x8x8 latents is far too small to fill a GPU (its step is launch-bound);
`--preset dit_b2_256` (DiT-B/2 on 4x32x32 latents, batch 256) is the size MFU is meant for.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from raydae.config import load_config  # noqa: E402
from raydae.tasks import make_task, warmup_scale  # noqa: E402

# bf16 dense tensor-core peaks (no sparsity), TFLOP/s; the first name found in the device name wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]


def detect_peak(name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--model", default=None, help="dit.model (default: the preset's)")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="latent side (default: data.image_size / ae.downsample_factor)")
    parser.add_argument("--latent-channels", type=int, default=None, help="default: ae.latent_channels")
    parser.add_argument("--batch-size", type=int, default=None, help="default: generator_train.batch_size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="train.precision (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads (default: scaling.torch_threads, else cpus_per_worker)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's bf16 dense peak (default: detected: H100/H200 989, A100 312)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/dit_mfu-<time>.json)")
    args = parser.parse_args()
    benchlib.check_device(args.device)
    cuda = args.device.startswith("cuda")
    precision = args.precision or ("bf16" if cuda else "fp32")
    overrides = ["generator=dit", "ae.bottleneck=kl", f"train.precision={precision}"]
    if args.model:
        overrides.append(f"dit.model={args.model}")
    if args.batch_size:
        overrides.append(f"generator_train.batch_size={args.batch_size}")
    config = load_config(args.preset, overrides=overrides + args.overrides)
    size = args.latent_size or config.data.image_size // config.ae.downsample_factor
    channels = args.latent_channels or config.ae.latent_channels
    batch_size = config.generator_train.batch_size
    info = benchlib.machine(args.device)
    benchlib.warn_other_load(info)
    print(f"machine: {benchlib.describe(info)}")
    if not cuda:
        threads = args.threads or max(1, config.scaling.torch_threads or int(config.scaling.cpus_per_worker))
        torch.set_num_threads(threads)

    device = torch.device(args.device)
    num_classes = 5
    facts = {"latent_shape": [channels, size, size], "num_classes": num_classes, "latent_std": 1.0}
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device_type=device.type, enabled=False))

    def latents(n: int) -> dict:
        return {"mean": torch.randn(n, channels * size * size, device=device),
                "logvar": torch.full((n, channels * size * size), -4.0, device=device),
                "label": torch.randint(0, num_classes, (n,), device=device)}

    # Model FLOPs, counted on a plain twin (not compiled, no recomputation: MFU counts the model's FLOPs, not
    # the hardware's) at a small batch and scaled: every FLOP of a DiT step is per sample.
    plain = load_config(args.preset, overrides=overrides + args.overrides + [
        "generator_train.compile=false", "dit.activation_checkpointing=false"])
    counting = make_task(plain, "generator", facts)
    counting.prepare(device)
    small = min(batch_size, 8)
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        counting.train_step(latents(small), 0)
    flops = counter.get_total_flops() * batch_size / small
    flops_by_operator = {str(k): v * batch_size / small for k, v in counter.get_flop_counts().get("Global", {}).items()}
    del counting
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the twin's weights and AdamW state (~11 GB for XL/2) leave the cache too

    torch.manual_seed(0)
    task = make_task(config, "generator", facts)
    task.prepare(device)
    params = sum(p.numel() for p in task.dit.parameters())
    batch = latents(batch_size)
    train_config = task.train_config

    def step(i: int) -> None:
        with autocast:
            task.train_step(batch, i, lr_scale=warmup_scale(i, train_config.warmup_steps))

    for i in range(args.warmup):  # with generator_train.compile, the first steps compile
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    achieved = flops / seconds / 1e12

    peak = args.peak_tflops
    mfu = None
    if not cuda:
        reason = "MFU skipped: on a CPU there is no bf16 tensor-core peak to compare with"
    else:
        name = torch.cuda.get_device_name()
        peak = peak or detect_peak(name)
        if peak is None:
            reason = f"MFU skipped: no known bf16 peak for {name!r}; pass --peak-tflops"
        else:
            mfu = achieved / peak
            reason = f"against {peak:.0f} TFLOP/s bf16 dense ({'given' if args.peak_tflops else name})"
    rows = [
        ("DiT parameters (M)", params / 1e6, config.dit.model),
        ("FLOPs per step (GFLOP, fwd+bwd)", flops / 1e9, "FlopCounterMode"),
        ("step time, ms", seconds * 1e3, f"mean of {args.steps} after {args.warmup} warm-up"),
        ("latents/s", batch_size / seconds, ""),
        ("achieved TFLOP/s", achieved, precision),
        ("MFU", mfu, reason),
    ]
    print()
    print(f"DiT step: {config.dit.model}, latents {channels}x{size}x{size}, batch {batch_size}, {precision}, "
          f"device {args.device}")
    print(benchlib.table(rows, ("figure", "value", "note")))
    if mfu is None:
        print(reason)
    path = benchlib.write_result(args.out, "dit_mfu", {
        "machine": info,
        "settings": {"preset": args.preset, "model": config.dit.model, "latent_shape": [channels, size, size],
                     "batch_size": batch_size, "precision": precision, "steps": args.steps, "warmup": args.warmup,
                     "device": args.device, "overrides": args.overrides,
                     "compile": config.generator_train.compile,
                     "activation_checkpointing": config.dit.activation_checkpointing,
                     "torch_threads": torch.get_num_threads() if not cuda else None},
        "summary": {"parameters": params, "flops_per_step": flops, "step_seconds": seconds,
                    "latents_per_second": batch_size / seconds, "achieved_tflops": achieved,
                    "peak_tflops": peak, "mfu": mfu, "note": reason},
        "flops_by_operator": flops_by_operator,
    })
    print(f"wrote {path}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
