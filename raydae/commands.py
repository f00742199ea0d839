"""The `raydae` commands that need torch or Ray: each takes the parsed arguments and prints its results.

`cli.py` imports this module by name only when one of these commands runs (see HEAVY_COMMANDS there).
"""

from __future__ import annotations

import argparse
import json

# First: importing it sets Ray's logging settings, which Ray reads when it is imported (below, through pipeline).
from raydae import ray_env  # noqa: F401, I001
from raydae.data.pack import pack_folder
from raydae.errors import UserError
from raydae.pipeline import RunOptions, evaluate_folder, run_pipeline
from raydae.report import write_report
from raydae.sampling import sample_run
from raydae.summary import run_summary
from raydae.sweep import run_sweep
from raydae.sweep_spec import load_sweep


def run(args: argparse.Namespace) -> int:
    config = args.run_config  # loaded and checked by the CLI before this module's imports
    run_options = RunOptions(storage=args.storage, name=args.name, resume=args.resume,
                             overwrite=args.overwrite, address=args.address, stage1_from=args.stage1_from)
    metrics = run_pipeline(config, run_options)
    print("\n" + run_summary(metrics))
    return 0


def sample(args: argparse.Namespace) -> int:
    if args.n <= 0:
        raise UserError(f"--n {args.n}: give a positive number of samples")
    sample_run(args.run_dir, args.n, args.out, args.out_dir, args.seed, args.steps, args.cfg)
    print(f"wrote {args.n} samples to {args.out}" + (f" and {args.out_dir}/" if args.out_dir else ""))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_folder(args.run_dir, args.overrides, args.address)
    print(json.dumps(metrics["eval"], indent=2, default=str))
    print(f"\nresults: {args.run_dir.rstrip('/')}/metrics.json (key: eval)")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """`raydae sweep FILE` and `raydae study FILE` (a sweep file with a `study:` section)."""
    if args.command == "study" and not load_sweep(args.file).study:
        raise UserError(f"{args.file} has no `study:` section; run it with `raydae sweep`, or see studies/")
    summary = run_sweep(args.file, resume=args.resume, address=args.address, storage=args.storage)
    for row in summary["trials"]:
        value = "" if row["value"] is None else f"{row['metric']} {row['value']:.4g}"
        print(f"{row['status']:9s} {row['trial']}  {value}")
    best = summary["best"]
    if best:
        print(f"best: {best['trial']} ({best['metric']} = {best['value']:.4g}); "
              f"config: {summary['experiment']}/best_config.yaml")
        report_paths = write_report(summary["experiment"], metric=best["metric"], mode=summary["mode"])
        print(f"report: {report_paths['report']}")
    else:
        print("no trial finished; nothing to rank")
    if "study" in summary:
        print(summary["study"]["markdown"])
        print(f"study: {summary['experiment']}/study.md (and study.json)")
    print(f"results: {summary['experiment']}/results.csv   tensorboard --logdir {summary['experiment']}")
    return 0


def report(args: argparse.Namespace) -> int:
    result = write_report(args.path, metric=args.metric, mode=args.mode)
    print(f"report: {result['report']} ({result['runs']} run(s), metric {result['metric']})")
    for figure in result["figures"].values():
        print(f"figure: {figure['path']}")
    return 0


def pack(args: argparse.Namespace) -> int:
    """`raydae data pack`."""
    manifest = pack_folder(args.src, args.dst, image_size=args.size, shard_size=args.shard_size,
                           on_bad_file=args.on_bad_file)
    # The progress line above gave the counts; say where the set is and how to use it.
    print(f"packed data set in {args.dst}: train on it with --set data.source={args.dst}"
          + ("; the skipped files are listed in its manifest" if manifest.get("skipped") else ""))
    return 0
