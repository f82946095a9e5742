"""The Milvus flags shared by `lpjepa index build`, `lpjepa search` and `lpjepa serve`, and `lpjepa milvus serve`.

    --backend milvus --milvus-uri PATH_OR_URL [--milvus-token T] [--collection NAME] [--milvus-index exact|wand]

PATH_OR_URL is a local ``*.db`` file (embedded Milvus Lite: one process at a time) or ``http://host:port``
(``lpjepa milvus serve``, Milvus standalone or a cluster: any number of processes). The token may also come from
``$LPJEPA_MILVUS_TOKEN``, so it need not appear in ``ps`` output.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from cli.argtypes import positive_int
from cli.errors import CliError

TOKEN_ENV = "LPJEPA_MILVUS_TOKEN"
DEFAULT_COLLECTION = "lpjepa"  # index.milvus_index.DEFAULT_COLLECTION (not imported: --help stays light)


def add_milvus_arguments(parser: argparse.ArgumentParser, *, index_kind: bool = False, timeout_s: float = 10.0) -> None:
    group = parser.add_argument_group("Milvus (with --backend milvus)")
    group.add_argument(
        "--milvus-uri",
        metavar="PATH_OR_URL",
        help="a local .db file (embedded Milvus Lite, one process) or http://host:port (lpjepa milvus serve,"
        " a cluster)",
    )
    group.add_argument("--milvus-token", metavar="T", help=f"user:password or API key (default: ${TOKEN_ENV} if set)")
    group.add_argument(
        "--collection", metavar="NAME", default=DEFAULT_COLLECTION, help=f"collection (default {DEFAULT_COLLECTION})"
    )
    group.add_argument(
        "--milvus-timeout",
        metavar="S",
        type=float,
        default=timeout_s,
        help=f"seconds per Milvus call (default {timeout_s:g}); a dead Milvus is reported after about twice this",
    )
    if index_kind:
        group.add_argument(
            "--milvus-index",
            choices=("exact", "wand"),
            default="exact",
            help="exact: SPARSE_INVERTED_INDEX without pruning (default); wand: SPARSE_WAND",
        )


def milvus_options(args: argparse.Namespace) -> dict[str, Any]:
    """create_index options from the flags; a CliError when --milvus-uri is missing."""
    if not args.milvus_uri:
        raise CliError("--backend milvus needs --milvus-uri (a .db file or http://host:port)")
    if not args.milvus_timeout > 0:
        raise CliError(f"--milvus-timeout must be positive, got {args.milvus_timeout}")
    options: dict[str, Any] = {
        "uri": args.milvus_uri,
        "collection": args.collection,
        "token": args.milvus_token or os.environ.get(TOKEN_ENV) or None,
        "timeout_s": args.milvus_timeout,
    }
    if getattr(args, "milvus_index", None):
        options["index"] = args.milvus_index
    return options


def reject_milvus_flags_without_backend(args: argparse.Namespace, backend: str | None = None) -> None:
    if args.milvus_uri and (backend or getattr(args, "backend", None)) != "milvus":
        raise CliError("--milvus-uri is for --backend milvus")


def register(subparsers: argparse._SubParsersAction) -> None:
    milvus = subparsers.add_parser("milvus", help="run a local Milvus server (milvus-lite) for several processes")
    from cli.parser import OneLineParser

    actions = milvus.add_subparsers(dest="milvus_command", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    serve = actions.add_parser(
        "serve",
        help="serve DATA_DIR/milvus.db on a TCP port",
        description="Run milvus-lite's engine as a gRPC server so several processes on this machine share one "
        "database: connect them with --milvus-uri http://HOST:PORT. For several machines use Milvus standalone or "
        "a cluster (docs/DEPLOY.md). Stops on SIGINT/SIGTERM.",
    )
    serve.add_argument("--data-dir", required=True, help="directory of the database file (created if missing)")
    serve.add_argument("--port", type=positive_int, default=19530, help="TCP port (default 19530)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from index.milvus_server import LocalMilvus

    server = LocalMilvus(args.data_dir, args.port, host=args.host).start()

    def stop(signum: int, _frame: Any) -> None:
        # Only leave the wait: stopping here would wait for the child inside the outer wait (which holds the
        # Popen's wait lock), so the child could not be reaped. The finally below stops it.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"lpjepa milvus: serving {server.data_dir} on {server.uri}", flush=True)
    try:
        return server.wait()
    finally:
        server.stop()
