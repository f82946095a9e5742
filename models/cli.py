"""`lpjepa target`: inspect the RGN_p(mu, sigma) target before training, or solve mu for an activation rate.

The analytic module is imported inside the handler (scipy is slow to import) so `lpjepa --help` stays fast; it
imports no torch at all.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from cli.errors import CliError


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"activation rate must be strictly between 0 and 1, got {text!r}")
    return value


def _sigma_spec(text: str) -> str | float:
    word = text.strip().lower()
    if word in ("gn", "rgn"):
        return word
    try:
        value = float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'gn', 'rgn' or a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"sigma must be a finite number > 0, got {text!r}")
    return value


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `target` subcommand (called by cli.main with OneLineParser subparsers)."""
    parser = subparsers.add_parser(
        "target",
        help="show the RGN_p target's sigma, expected l0/l1, mean and variance; or solve mu for a rate",
        description=(
            "Rectified generalized Gaussian target RGN_p(mu, sigma) = law of ReLU(X), X ~ GN_p(mu, sigma). "
            "Give --mu, or --l0 to solve mu for an expected activation rate."
        ),
    )
    if hasattr(parser, "_negative_number_matcher"):
        # argparse (< 3.13) only sees '-3' / '-.5' as numbers, so '--mu -1e3' would read as a missing value.
        parser._negative_number_matcher = _NEGATIVE_NUMBER
    parser.add_argument("--p", type=_positive_float, default=1.0, help="shape p > 0 (2: Gaussian, 1: Laplace)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mu", type=_finite_float, help="location mu (< 0 gives sparse codes)")
    where.add_argument("--l0", type=_rate, metavar="RATE", help="expected activation rate in (0, 1); mu solved")
    parser.add_argument(
        "--sigma",
        type=_sigma_spec,
        default="gn",
        help="gn (unit variance before ReLU, default), rgn (unit variance after ReLU) or a number > 0",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run_target)


_SIGMA_NOTES = {
    "gn": "sigma_GN: unit variance before rectification",
    "rgn": "sigma_RGN: unit variance after rectification",
}


def run_target(args: argparse.Namespace) -> int:
    from models import rgg_law

    try:
        if args.l0 is not None:
            mu, sigma = rgg_law.mu_for_l0(args.p, args.l0, args.sigma)
        else:
            mu = args.mu
            sigma = rgg_law.resolve_sigma(args.p, mu, args.sigma)
        summary = rgg_law.target_summary(args.p, mu, sigma)
    except (ValueError, ArithmeticError) as err:  # ArithmeticError: a range no double can hold
        raise CliError(str(err)) from None
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    sigma_note = _SIGMA_NOTES.get(args.sigma, "given") if isinstance(args.sigma, str) else "given"
    mu_note = f"solved for expected l0 = {args.l0:g}" if args.l0 is not None else "given"
    rows = [
        ("p", f"{summary['p']:.6g}", ""),
        ("mu", f"{summary['mu']:.6g}", mu_note),
        ("sigma", f"{summary['sigma']:.6g}", sigma_note),
        ("expected l0", f"{summary['expected_l0']:.6g}", "activation rate P(X > 0)"),
        ("expected l1", f"{summary['expected_l1']:.6g}", "(E x)^2 / E x^2"),
        ("mean", f"{summary['mean']:.6g}", "E ReLU(X)"),
        ("var", f"{summary['var']:.6g}", "Var ReLU(X)"),
    ]
    lines = [f"RGN_{summary['p']:g} target"]
    lines += [f"  {name:<12} {value:>14}  {note}".rstrip() for name, value, note in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
