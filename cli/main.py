"""Entry point of `lpjepa`: each stage registers its own subcommands, imported lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cli.errors import INTERRUPTED, exit_code
from cli.parser import OneLineParser

# Modules that own a subcommand family; each exposes `register(subparsers)`.
STAGE_CLIS = (
    "models.cli",  # target
    "pretrain.cli",  # train, eval
    "export.cli",  # export
    "index.cli",  # index, search
    "index.milvus_cli",  # milvus serve
    "serve.cli",  # serve
    "ood.cli",  # ood calibrate, ood eval, ood score
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lpjepa",
        description="Rectified LpJEPA sparse image embeddings: train, evaluate, export, index, serve, score.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name in STAGE_CLIS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"lpjepa {args.command}: interrupted\n")
        return INTERRUPTED
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        sys.stderr.write(f"lpjepa {args.command}: error: {err}\n")
        return code
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
