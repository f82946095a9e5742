"""`lpjepa ood calibrate | eval | score`: the OOD stage of the command line.

Heavy imports (onnxruntime, faiss, torch via the data sources) happen inside the handlers so `lpjepa --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.argtypes import positive_int as _positive_int
from cli.errors import CliError
from cli.parser import OneLineParser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from err
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _window(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the drift window needs at least 2 images, got {text!r}")
    return value


def _flags(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags passed on under their own names."""
    return {name: getattr(args, name) for name in names}


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _calibrate(args: argparse.Namespace) -> int:
    from ood.calibration import calibrate_model
    from ood.shifts import SHIFT_NAMES

    same = ("limit", "tpr", "seed", "batch_size", "validate_ood", "validate_limit", "shift_limit", "drift_window")
    shifts = [] if args.no_shifts else list(SHIFT_NAMES)
    cal = calibrate_model(args.model, args.data, **_flags(args, same), progress=not args.no_progress, shifts=shifts)
    summary = _calibration_summary(args, cal)
    if args.json:
        _print_json(summary)
    else:
        _print_calibration(args, cal, summary)
    return 0


def _calibration_summary(args: argparse.Namespace, cal: dict[str, Any]) -> dict[str, Any]:
    """What `ood calibrate --json` prints: the calibration's facts without its fitted arrays."""
    sel, served, l0 = cal["selection"], cal["scores"][cal["served"]], cal["l0"]
    return {
        "model": args.model,
        "data": args.data,
        **{key: cal[key] for key in ("n", "n_fit", "n_holdout", "dim", "feature_dim", "tpr", "served")},
        **{key: sel[key] for key in ("reason", "rule")},
        **{key: served[key] for key in ("threshold", "holdout_tpr")},
        "scores": cal["scores"],
        **{key: sel[key] for key in ("validation_sets", "summary", "table")},
        "drift_window": cal["drift"]["window"],
        **{f"l0_{key}": l0[key] for key in ("mean", "std", "expected")},
        "dead_dims": cal["dead_dims"],
    }


def _print_calibration(args: argparse.Namespace, cal: dict[str, Any], summary: dict[str, Any]) -> None:
    selection = cal["selection"]
    expected = "n/a" if summary["l0_expected"] is None else f"{summary['l0_expected']:.4f}"
    print(
        f"calibrated {args.model} on {cal['n']} images of {args.data} "
        f"({cal['n_fit']} fit the scores, {cal['n_holdout']} set thresholds and are the ID side of validation)"
    )
    print(
        f"  l0 mean {summary['l0_mean']:.4f} (std {summary['l0_std']:.4f}, analytic {expected}); "
        f"{summary['dead_dims']} of {summary['dim']} dimensions never fired"
    )
    if selection["summary"]:
        sets = selection["validation_sets"]
        by = {(r["score"], r["set"]): r for r in selection["table"]}
        width = max(len(n) for n in selection["summary"]) + 2
        print(f"  AUROC on the validation sets ({selection['rule']}):")
        print("  " + f"{'score':<{width}}" + "".join(f"{name[:14]:>15}" for name in sets) + f"{'min':>8}")
        for name, row in sorted(selection["summary"].items(), key=lambda kv: -kv[1]["min_auroc"]):
            cells = "".join(f"{by[(name, st)]['auroc']:>15.3f}" for st in sets)
            mark = "  <- served" if name == cal["served"] else ""
            print(f"  {name:<{width}}{cells}{row['min_auroc']:>8.3f}{mark}")
    print(f"  served: {selection['reason']}")
    print(
        f"  threshold {summary['threshold']:.4f} on {cal['served']} for {cal['tpr']:.0%} ID TPR "
        f"(held-out TPR {summary['holdout_tpr']:.4f}); drift window {summary['drift_window']}; stored with the model"
    )


def _format_table(report: dict[str, Any]) -> str:
    lines = [
        f"ID {report['id']['spec']} ({report['id']['n']})  vs  OOD {report['ood']['spec']} "
        f"({report['ood']['n']}); baselines fitted on {report['train']['how']}",
        f"{'method':<20}{'AUROC':>8}{'FPR@95':>8}{'AUPR':>8}{'us/input':>10}  needs at scoring time",
    ]
    for name, m in report["methods"].items():
        mark = "  [served]" if m.get("served") else ""
        lines.append(
            f"{name:<20}{m['auroc']:>8.4f}{m['fpr95']:>8.4f}{m['aupr']:>8.4f}{m['score_us']:>10.2f}  {m['needs']}{mark}"
        )
    op, l0 = report["operating_point"], report["l0"]
    expected = "n/a" if l0["expected"] is None else f"{l0['expected']:.4f}"
    flagged = "n/a" if op["ood_detected"] is None else f"{op['ood_detected']:.4f}"
    id_tpr = "n/a" if op["id_tpr"] is None else f"{op['id_tpr']:.4f}"
    lines.append(
        f"served {report['served']}, threshold {op['threshold']:.4f}: ID TPR {id_tpr}, OOD flagged {flagged}"
        f"  (calibration: {report['calibration']['from']})"
    )
    lines.append(
        f"l0: ID {l0['id_mean']:.4f} +- {l0['id_std']:.4f}, OOD {l0['ood_mean']:.4f} +- {l0['ood_std']:.4f}"
        f", analytic {expected}"
    )
    batch = ", ".join(f"{m}: {v:.3f}" for m, v in report["batch_l0_auroc"].items())
    lines.append(f"data-set-level rate shift, AUROC of |batch mean l0 - ID mean| by batch size: {batch}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from core.atomic_io import atomic_write_text
    from ood.evaluate import evaluate_model

    same = ("limit", "train_limit", "k", "seed", "batch_size", "recalibrate")
    result = evaluate_model(args.model, args.id, args.ood, **_flags(args, same), progress=not args.no_progress)
    if args.out:
        atomic_write_text(args.out, json.dumps(result.report, indent=2) + "\n")
    if args.json:
        _print_json(result.report)
    else:
        print(_format_table(result.report))
    return 0


def _score(args: argparse.Namespace) -> int:
    from data.sources import open_image
    from ood.inputs import embed_images, image_paths, open_runtime
    from ood.suite import ScoreSuite

    files = image_paths(args.paths)
    runtime = open_runtime(args.model)
    cal = runtime.ood_calibration
    if cal is None:
        raise CliError(
            f"model {args.model} has no OOD calibration; run `lpjepa ood calibrate --model "
            f"{args.model} --data SPEC` first"
        )
    suite = ScoreSuite.from_calibration(cal)
    if suite.needs_features() and not runtime.feature_dim:
        raise CliError(f"the calibration serves {suite.served}, but {args.model} has no encoder-feature output")
    loaders = [(str(f), (lambda f=f: open_image(f))) for f in files]
    embedded = embed_images(runtime, loaders, batch_size=args.batch_size, progress=not args.no_progress, desc="score")
    scored = suite.score(embedded.inputs()).to_records() if embedded.n else []
    records = [{"path": str(files[pos]), **rec} for pos, rec in zip(embedded.indices, scored, strict=True)]
    failed = [{"path": name, "error": reason} for name, reason in embedded.failed]
    if args.json:
        head = {"model": args.model, "score_name": suite.served, "threshold": suite.threshold, "tpr": suite.tpr}
        _print_json({**head, "results": records, "failed": failed})
        return 0
    width = max([len(r["path"]) for r in records] + [4])
    print(f"{'path':<{width}}  {'score':>9}  {'l0':>7}  {'rate':>7}  {'pattern':>8}  ood")
    for r in records:
        print(
            f"{r['path']:<{width}}  {r['score']:>9.3f}  {r['l0']:>7.4f}  {r['rate_score']:>7.3f}  "
            f"{r['pattern_score']:>8.4f}  {'yes' if r['is_ood'] else 'no'}"
        )
    for f in failed:
        print(f"{f['path']:<{width}}  unreadable: {f['error']}")
    n_ood = sum(r["is_ood"] for r in records)
    print(f"{n_ood} of {len(records)} flagged out-of-distribution by {suite.served} (threshold {suite.threshold:.4f})")
    return 0


def register(subparsers: Any) -> None:
    ood = subparsers.add_parser(
        "ood",
        help="out-of-distribution scoring from activation statistics",
        description="Calibrate, evaluate and apply the activation-rate OOD scores.",
    )
    sub = ood.add_subparsers(dest="ood_command", metavar="ACTION", parser_class=OneLineParser)
    sub.required = True
    _calibrate_arguments(
        _action(
            sub,
            "calibrate",
            _calibrate,
            "fit the OOD scores on in-distribution data and store them in the model",
            "Embed in-distribution images, fit every OOD score on one part, set the thresholds on the other, evaluate "
            "each score against the --validate-ood sets and synthetic shifts of the ID data, serve the one with the "
            "best worst-case AUROC, and store the calibration (with the drift monitor's null) in the model.",
        )
    )
    _eval_arguments(
        _action(
            sub,
            "eval",
            _eval,
            "AUROC / FPR@95 / AUPR of the scores beside KNN and Mahalanobis",
            "Evaluate the activation scores and baselines, OOD as the positive class.",
        )
    )
    score = _action(
        sub,
        "score",
        _score,
        "per-image OOD scores with the model's stored calibration",
        "Score image files or folders: score, l0, is_ood per image.",
    )
    score.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER")


def _action(sub: Any, name: str, func: Any, help: str, description: str) -> argparse.ArgumentParser:
    """An `ood` action with the flags every action takes."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--model", required=True, help="exported model (.onnx)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per runtime call")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=func)
    return p


def _calibrate_arguments(cal: argparse.ArgumentParser) -> None:
    cal.add_argument("--data", required=True, help="in-distribution data spec (built-in name or image folder)")
    cal.add_argument("--limit", type=_positive_int, default=None, help="use a seeded random subset of this size")
    cal.add_argument("--tpr", type=_fraction, default=0.95, help="in-distribution true positive rate (0.95)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument(
        "--validate-ood",
        action="append",
        default=[],
        metavar="SPEC",
        help="an OOD data set to choose the served score on (repeatable), e.g. mnist or samples:cifar10",
    )
    cal.add_argument("--validate-limit", type=_positive_int, default=2000, help="images per --validate-ood set (2000)")
    cal.add_argument("--shift-limit", type=_positive_int, default=1000, help="ID images per synthetic shift (1000)")
    cal.add_argument(
        "--no-shifts",
        action="store_true",
        help="do not validate on the synthetic shifts (noise, blur, invert, rotate) of the ID data",
    )
    cal.add_argument(
        "--drift-window", type=_window, default=64, help="images in the server's drift-monitor window (64)"
    )


def _eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--id", required=True, help="in-distribution evaluation spec, e.g. fashion-mnist:test")
    ev.add_argument("--ood", required=True, help="out-of-distribution spec, e.g. mnist or an image folder")
    ev.add_argument("--limit", type=_positive_int, default=None, help="cap on ID and OOD evaluation images each")
    ev.add_argument(
        "--train-limit", type=_positive_int, default=10000, help="ID train images for KNN/Mahalanobis (10000)"
    )
    ev.add_argument("--k", type=_positive_int, default=50, help="KNN neighbours (50)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--recalibrate",
        action="store_true",
        help="calibrate on the ID train split instead of using the model's stored calibration",
    )
    ev.add_argument("--out", default=None, help="also write the JSON report to this file")
