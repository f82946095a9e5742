"""`lpjepa train`: pretrain an encoder from a packaged or user config; registers `lpjepa eval` too.

torch is imported inside the handler so `lpjepa --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cli.errors import CliError
from pretrain.evaluate.cli import register_eval

EXIT_INTERRUPTED = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a sparse encoder (Rectified LpJEPA or a baseline)",
        description=(
            "Train an encoder on a data set. --config names a packaged config (smoke, fmnist-cpu, cifar10-gpu, "
            "cifar100-gpu, imagenet100-gpu) or a JSON file; --set overrides any key, e.g. --set method.mu=-1 "
            "--set optim.lr=0.01 --set model.backbone_kwargs.width=0.5. Writes RUN_DIR/config.json, "
            "model.safetensors, train_state.pt, metrics.jsonl and summary.json. Ctrl-C writes a checkpoint "
            "and exits 130; --resume continues it. Launch with torchrun for multi-GPU / multi-node DDP."
        ),
    )
    parser.add_argument("--config", metavar="NAME_OR_PATH", help="packaged config name or path to a .json file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable); values are JSON or plain strings",
    )
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (or resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from train_state.pt")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run in RUN_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.set_defaults(func=run_train)
    calibrate = subparsers.add_parser(
        "calibrate",
        help="calibrate a finished run's per-dimension rates on clean train images",
        description=(
            "Move each dimension's last bias by its (1 - r) quantile over clean train images so the deployed code "
            "fires at the designed rate r on clean inputs: the step training ends with "
            "(train.rate_calibration), for a run trained without it. Rewrites RUN_DIR/model.safetensors and "
            "config.json atomically; the backbone is untouched."
        ),
    )
    calibrate.add_argument("run", metavar="RUN_DIR", help="a finished run folder")
    calibrate.add_argument(
        "--images", type=int, default=None, metavar="N", help="clean train images (default: the config's)"
    )
    calibrate.add_argument("--force", action="store_true", help="calibrate a run that already was")
    calibrate.add_argument("--json", action="store_true", help="print the result as JSON")
    calibrate.set_defaults(func=run_calibrate)
    register_eval(subparsers)


def run_calibrate(args: argparse.Namespace) -> int:
    from pretrain.rate_calibration import calibrate_run

    result = calibrate_run(args.run, images=args.images, force=args.force)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(
            f"calibrated {args.run} on {result['images']} images: l0 before {result['l0_before']:.4f} "
            f"(rate {result['rate']:.4f}), {result['dead_before']} dimensions silent before, mean |shift| "
            f"{result['shift_abs_mean']:.4f}\n"
        )
    return 0


def _load(args: argparse.Namespace):  # -> TrainConfig
    # ConfigError, TrainError, ... reach cli.main, which prints their one-line message (exit 2).
    from pretrain.config import apply_override, load_config
    from pretrain.rundir import read_run_config

    if args.config:
        return load_config(args.config, args.overrides)
    if not args.resume:
        raise CliError("--config is required (or --resume to continue the run in --out)")
    cfg = read_run_config(args.out)
    for assignment in args.overrides:
        apply_override(cfg, assignment)
    cfg.validate()
    return cfg


def run_train(args: argparse.Namespace) -> int:
    if args.resume and args.force:
        raise CliError("--resume and --force exclude each other")
    cfg = _load(args)
    if args.print_config:
        sys.stdout.write(cfg.to_json() + "\n")
        return 0
    from pretrain.trainer import INTERRUPTED, train

    rank = int(os.environ.get("RANK", "0"))
    result = train(cfg, args.out, resume=args.resume, force=args.force, progress=False if args.no_progress else None)
    last = result.summary.get("last", {})
    line = {
        k: last.get(k)
        for k in ("step", "loss", "l0", "target_l0", "dead_dims", "probe_acc", "images_per_s")
        if k in last
    }
    if result.status == INTERRUPTED:
        sys.stderr.write(
            f"lpjepa train: interrupted at step {result.step}/{result.total_steps}; checkpoint in "
            f"{result.run_dir}; continue with --resume\n"
        )
        return EXIT_INTERRUPTED
    if rank == 0:
        sys.stdout.write(f"trained {result.step}/{result.total_steps} steps -> {result.run_dir} {json.dumps(line)}\n")
    return 0
