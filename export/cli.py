"""`lpjepa export`: checkpoint or run directory -> parity-checked ONNX file or TensorRT engine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.argtypes import positive_int as _positive
from cli.errors import CliError

PRECISIONS = ("fp32", "fp16", "int8")  # mirrored from export.onnx_export without importing torch for --help
FORMATS = ("onnx", "tensorrt")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (fp32/fp16/int8) or TensorRT, with parity checks",
        description="Export CHECKPOINT_OR_RUN to one ONNX file (dynamic batch axis `batch`, rectified embedding "
        "out, metadata inside) after checking it against PyTorch on real images.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", help="a .safetensors checkpoint or a run directory")
    p.add_argument("--out", required=True, type=Path, help="output file (.onnx, or .engine/.plan for TensorRT)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18, minimum 17)")
    p.add_argument("--format", choices=FORMATS, default="onnx", dest="fmt")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter (default: the torch.export-based one)",
    )
    p.add_argument(
        "--parity-data",
        default=None,
        metavar="SPEC",
        help="data spec for parity images (default: fashion-mnist:test for grey models, the colour "
        "sample images for colour models)",
    )
    p.add_argument("--parity-images", type=_positive, default=512, metavar="N")
    p.add_argument(
        "--calibration-data",
        default=None,
        metavar="SPEC",
        help="data spec for int8 calibration (default: fashion-mnist:train / colour sample images)",
    )
    p.add_argument("--calibration-images", type=_positive, default=256, metavar="N")
    p.add_argument(
        "--max-l0-drift",
        type=float,
        default=None,
        metavar="X",
        help="fp16/int8 gate: largest allowed |l0 - l0_fp32| (default fp16 0.005, int8 0.02)",
    )
    p.add_argument(
        "--min-overlap",
        type=float,
        default=None,
        metavar="X",
        help="fp16/int8 gate: smallest allowed top-10 neighbour overlap (default fp16 0.95, int8 0.70)",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the parity checks (not recommended)")
    p.add_argument(
        "--no-features",
        action="store_true",
        help="do not add the encoder features as a second ONNX output (used by the feature_mahalanobis OOD score)",
    )
    p.add_argument(
        "--ood-calibration",
        type=Path,
        default=None,
        metavar="JSON",
        help="OOD calibration JSON to embed in the model's metadata",
    )
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="write the parity report as JSON")
    p.add_argument("--min-batch", type=_positive, default=1, help="TensorRT profile: smallest batch")
    p.add_argument("--opt-batch", type=_positive, default=32, help="TensorRT profile: batch to optimise for")
    p.add_argument("--max-batch", type=_positive, default=256, help="TensorRT profile: largest batch")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from export.metadata import ENGINE_SUFFIXES, ONNX_SUFFIXES, json_object

    allowed = ONNX_SUFFIXES if args.fmt == "onnx" else ENGINE_SUFFIXES
    if args.out.suffix.lower() not in allowed:
        raise CliError(f"--out {args.out}: a {args.fmt} export must end in {' or '.join(allowed)}")
    if args.out.exists() and args.out.is_dir():
        raise CliError(f"--out {args.out} is a directory")
    ood = None if args.ood_calibration is None else json_object(args.ood_calibration, CliError, "--ood-calibration ")
    if args.fmt == "tensorrt":
        _check_tensorrt(args)
    from models.checkpoint import read_header

    read_header(args.checkpoint)  # fail fast on a missing/corrupt checkpoint, before importing exporters
    from export.errors import ParityError
    from export.onnx_export import export_checkpoint

    same = ("precision", "opset", "parity_images", "calibration_images", "exporter")  # flags passed under their names
    kwargs = dict(
        **{name: getattr(args, name) for name in same},
        calibration_source=args.calibration_data,
        parity=not args.no_parity,
        parity_source=args.parity_data,
        features=not args.no_features,
        ood_calibration=ood,
        tolerance=_tolerance(args),
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
        progress=sys.stderr.isatty(),
    )
    try:
        if args.fmt == "tensorrt":
            from export.tensorrt import export_tensorrt

            batches = dict(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)
            report = export_tensorrt(args.checkpoint, args.out, **batches, **kwargs)
        else:
            report = export_checkpoint(args.checkpoint, args.out, **kwargs)
    except ParityError as err:
        print(err.report.format())
        _write_report(args.report, err.report)
        raise CliError(f"{err}; nothing was written to {args.out}") from err
    except OSError as err:
        raise CliError(f"cannot write {args.out}: {err}") from err
    print(report.format() if report.checks else "parity not checked (--no-parity)")
    _write_report(args.report, report)
    print(f"wrote {args.out}")
    return 0


def _check_tensorrt(args: argparse.Namespace) -> None:
    if not args.min_batch <= args.opt_batch <= args.max_batch:
        raise CliError(
            f"need --min-batch <= --opt-batch <= --max-batch, got {args.min_batch}/{args.opt_batch}/{args.max_batch}"
        )
    from export.backends import missing_requirements

    missing = missing_requirements()
    if missing:
        raise CliError("--format tensorrt needs " + " and ".join(missing) + "; use --format onnx instead")


def _tolerance(args: argparse.Namespace) -> tuple[float, float] | None:
    """--max-l0-drift/--min-overlap over the precision's default gate (None: the defaults)."""
    if args.max_l0_drift is None and args.min_overlap is None:
        return None
    if args.precision == "fp32":
        raise CliError("--max-l0-drift/--min-overlap apply to --precision fp16 or int8 only")
    from export.parity import TOLERANCES

    default_drift, default_overlap = TOLERANCES[args.precision]
    drift = default_drift if args.max_l0_drift is None else args.max_l0_drift
    return drift, default_overlap if args.min_overlap is None else args.min_overlap


def _write_report(path: Path | None, report: object) -> None:
    if path is None:
        return
    from core.atomic_io import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")  # type: ignore[attr-defined]
