"""The `raydae` command: parse arguments, call the library, turn `UserError` into one line."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from raydae.config import load_config, preset_names
from raydae.errors import UserError

# The commands that need torch or Ray: command -> its function in raydae/commands.py. That module is
# imported by name, and only when one of them runs, so `raydae presets` and `raydae config` start without
# loading torch and Ray (a tenth of a second instead of seconds); `raydae run` checks its config before it.
HEAVY_COMMANDS_MODULE = "raydae.commands"
HEAVY_COMMANDS = {"run": "run", "sample": "sample", "eval": "evaluate", "sweep": "sweep", "study": "sweep",
                  "report": "report", "data": "pack"}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="built-in preset (see `raydae presets`)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file; several merge left to right, after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one field, e.g. --set ae.latent_channels=8 (applied last)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydae", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # `--debug` also after the command (`raydae run --debug`, `python raydae/run.py --debug`); SUPPRESS keeps
    # a sub-command's default from overwriting `raydae --debug run`.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[debug], help="train a run end to end (DAE stage 1 -> stage 2, or joint)")
    add_run_arguments(run)

    sample = sub.add_parser("sample", parents=[debug], help="draw samples from a finished run's generator into a PNG grid")
    sample.add_argument("run_dir", help="run folder (e.g. runs/dae-kl4-s0)")
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--out", default="samples.png", help="PNG grid to write")
    sample.add_argument("--out-dir", default=None, help="also write each sample as its own PNG here")
    sample.add_argument("--seed", type=int, default=0, help="same seed, same images")
    sample.add_argument("--steps", type=int, default=None, help="DiT: DDIM steps (default: dit.sample_steps)")
    sample.add_argument("--cfg", type=float, default=None, help="DiT: guidance scale (default: dit.cfg_scale)")

    evaluate = sub.add_parser("eval", parents=[debug],
                              help="score a finished run: sample quality, reconstruction, complexity -> metrics.json")
    evaluate.add_argument("run_dir", help="run folder (e.g. runs/dae-kl4-s0)")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE", dest="overrides",
                          help="change an evaluation setting, e.g. --set eval.num_samples=5000")
    evaluate.add_argument("--address", default=None,
                          help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    report = sub.add_parser("report", parents=[debug],
                            help="write report.md and PNG figures for a run, a folder of runs or a sweep")
    report.add_argument("path", help="a run folder, or a folder holding runs (a sweep)")
    report.add_argument("--metric", default=None, help="metric to sort and plot (default: the runs' headline)")
    report.add_argument("--mode", choices=["min", "max"], default=None, help="is lower or higher better")

    sweep = sub.add_parser("sweep", parents=[debug], help="Ray Tune over config fields (a sweep file, see sweeps/)")
    sweep.add_argument("file", help="sweep YAML file, e.g. sweeps/quick.yaml")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep of this name (also what re-running the command does)")
    sweep.add_argument("--storage", default=None, help="where the experiment folder goes (default: the file's storage)")
    sweep.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    study = sub.add_parser("study", parents=[debug],
                           help="DAE vs joint training over paired seeds (a sweep file with a study: section, see studies/)")
    study.add_argument("file", help="study YAML file, e.g. studies/cpu_shapes.yaml")
    study.add_argument("--resume", action="store_true", help="continue the study of this name (as re-running does)")
    study.add_argument("--storage", default=None, help="where the experiment folder goes (default: the file's storage)")
    study.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    sub.add_parser("presets", help="list the built-in presets")
    show = sub.add_parser("config", parents=[debug], help="print the resolved config as YAML")
    add_config_arguments(show)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pack = data_sub.add_parser("pack", parents=[debug], help="turn an image folder into Parquet shards with a manifest")
    pack.add_argument("src", help="image folder (png/jpg/webp, recursive; sub-folders become labels)")
    pack.add_argument("dst", help="new, empty output folder")
    pack.add_argument("--size", type=int, default=None, help="resize + centre-crop to SIZE x SIZE")
    pack.add_argument("--shard-size", type=int, default=1000,
                      help="images per Parquet file: each is one read task, so keep several per worker")
    pack.add_argument("--on-bad-file", choices=["error", "skip"], default="error")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--name", default="", help="run name (default: derived from mode, bottleneck, seed)")
    parser.add_argument("--storage", default="runs", help="where runs live: local folder, NFS mount or s3://")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--resume", action="store_true", help="accept a run name that is already finished")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run of this name first")
    parser.add_argument("--stage1-from", default=None, metavar="CHECKPOINT",
                        help="DAE: skip stage 1 and start stage 2 from this stage-1 checkpoint folder")


def line_buffered_console() -> None:
    """Every printed line leaves at once, also into a pipe or a file (`| tee run.log`, nohup, a job's log).

    Python block-buffers stdout that is not a terminal, so progress lines (the driver's own and the workers'
    that Ray forwards to it) would wait there until the run ends."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError, OSError):  # a stream replaced by one without reconfigure (tests)
            pass


def main(argv: list[str] | None = None) -> int:
    line_buffered_console()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"raydae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydae: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "presets":
        for name in preset_names():
            print(name)
        return 0
    if args.command == "config":
        print(load_config(args.preset, args.config, args.overrides).to_yaml(), end="")
        return 0
    if args.command == "run":
        # A mistake in the config is answered before torch and Ray load (seconds of imports).
        args.run_config = load_config(args.preset, args.config, args.overrides)
    commands = importlib.import_module(HEAVY_COMMANDS_MODULE)
    return getattr(commands, HEAVY_COMMANDS[args.command])(args)


if __name__ == "__main__":
    sys.exit(main())
