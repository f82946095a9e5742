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
    register_eval(subparsers)


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
