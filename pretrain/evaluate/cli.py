"""`lpjepa eval RUN_OR_CHECKPOINT --data SPEC`: offline probes, sparsity and nHSIC of a trained encoder.

torch and the evaluation modules are imported inside the handler so `lpjepa --help` stays fast.
pretrain/cli.py calls `register_eval(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.argtypes import non_negative_int as _non_negative_int
from cli.argtypes import positive_int as _positive_int
from cli.errors import CliError

DEFAULT_MAX_TRAIN = 0  # 0 = all, mirroring pipeline.DEFAULT_MAX_TRAIN without importing torch at --help time
DEFAULT_BATCH_SIZE = 256


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the `lpjepa` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="offline linear probe, kNN, sparsity and nHSIC of a checkpoint on a data set",
        description=(
            "Evaluate a checkpoint on frozen features: a linear probe (logistic regression, L-BFGS) and a "
            "weighted kNN (cosine, k=20, temperature 0.07) on backbone features and on projector outputs, "
            "trained on the data set's train split and scored on the split given by --data; the sparsity of "
            "the projector output (l0, l1 metric, dead dimensions) against the target's expected l0; and the "
            "normalized HSIC between embedding dimensions. Data without a separate train split (a folder, "
            "mnist) or the train split itself is evaluated on a seeded stratified 80/20 hold-out. Grey data "
            "into a colour model (or the reverse) is converted by the eval transform's PIL mode conversion."
        ),
    )
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run directory or model.safetensors file")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="data spec, e.g. fashion-mnist:test, mnist, cifar10:test@/data, or an image folder",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE (atomically)")
    parser.add_argument(
        "--max-train",
        type=_non_negative_int,
        default=DEFAULT_MAX_TRAIN,
        metavar="N",
        help="probe on at most N train images, a seeded subsample (default 0: all of the train split)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="score on at most N images of the evaluation split (default: all)",
    )
    parser.add_argument("--k", type=_positive_int, default=20, help="neighbours for kNN (default 20)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model and probes (default cpu)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every subsample (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.set_defaults(func=run_eval)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table printed without --json."""
    t = report["timings"]
    lines = [
        f"checkpoint  {report['checkpoint']}  (method {report['method']}, "
        f"target p={report['target']['p']:g} mu={report['target']['mu']:g} sigma={report['target']['sigma']:.4g})",
        f"probe train {report['train_data']}: {report['n_train']} images",
        f"evaluated   {report['eval_data']}: {report['n_eval']} images, {report['num_classes']} classes",
        "",
        f"{'features':<22}{'linear':>10}{'kNN k=' + str(report['k']):>12}",
        f"{'backbone (' + str(report['feature_dim']) + ')':<22}{_fmt(report['linear_acc']):>10}"
        f"{_fmt(report['knn_acc']):>12}",
        f"{'projector (' + str(report['dim']) + ')':<22}{_fmt(report['proj_linear_acc']):>10}"
        f"{_fmt(report['proj_knn_acc']):>12}",
        "",
        "projector output      measured    target",
        f"  l0 (active rate)    {_fmt(report['l0']):>8}  {_fmt(report['expected_l0']):>8}",
        f"  l1 metric           {_fmt(report['l1']):>8}  {_fmt(report['expected_l1']):>8}",
        f"  dead dims           {_fmt(report['dead_dims']):>8}  ({report['dead_dims_count']} of {report['dim']})",
        f"  nHSIC               {_fmt(report['nhsic']):>8}  ({report['nhsic_pairs']} pairs of "
        f"{report['nhsic_live_dims']} live dims, {report['nhsic_samples']} samples; lower = more independent)",
        "",
        f"time        {t['total_s']:.1f} s total: extraction {t['extract_train_s'] + t['extract_eval_s']:.1f} s "
        f"({t['extract_img_per_s']:.0f} img/s), probes {t['linear_s'] + t['proj_linear_s']:.1f} s linear + "
        f"{t['knn_s'] + t['proj_knn_s']:.1f} s kNN, nHSIC {t['nhsic_s']:.1f} s",
    ]
    lines += [f"note        {note}" for note in report["notes"]]
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from core.atomic_io import atomic_write_text
    from pretrain.evaluate.pipeline import evaluate_checkpoint

    # CheckpointError, DataSpecError and EvalError reach cli.main, which prints their one-line message (exit 2).
    report = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        max_train=args.max_train or None,
        limit=args.limit,
        k=args.k,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        seed=args.seed,
    )
    text = json.dumps(report, indent=2, allow_nan=False)
    if args.out:
        try:
            atomic_write_text(args.out, text + "\n")
        except OSError as err:
            raise CliError(f"cannot write {args.out}: {err}") from None
    sys.stdout.write((text if args.json else format_report(report)) + "\n")
    return 0
