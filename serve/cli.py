"""`lpjepa serve`: the HTTP API under uvicorn.

The model and index are loaded before the port is bound, so a wrong path or a dimension mismatch is a one-line
error (exit 2) rather than a traceback from inside the server's start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import Any

from cli.argtypes import positive_int
from cli.errors import CliError
from index.milvus_cli import add_milvus_arguments, reject_milvus_flags_without_backend

MILVUS_URI_ENV = "LPJEPA_MILVUS_URI"  # serve/settings.py's milvus_uri (not imported: --help stays light)
MB = 1024 * 1024
# The flags that set a ServeSettings field: (flag, field, type or argparse action, help). None is every flag's default,
# so a flag not given leaves its field to LPJEPA_<FIELD> or to its default in serve/settings.py (the help quotes it).
SETTING_FLAGS: tuple[tuple[str, str, type | str, str], ...] = (
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--port", "port", int, "port (default 8000; 0 picks a free one)"),
    ("--api-key", "api_key", str, "require Authorization: Bearer KEY for writes (default: $LPJEPA_API_KEY if set)"),
    ("--auth-reads", "auth_reads", "store_true", "require the API key for reads too"),
    ("--no-batching", "batching", "store_false", "one model call per request (the benchmark baseline)"),
    ("--threads", "model_threads", int, "ONNX Runtime threads per model call (default: all cores)"),
    ("--model-spin", "model_spin", "store_true", "let ONNX Runtime's idle threads spin-wait (faster on dedicated "
     "cores; off by default: on a shared or small machine they take the cores HTTP needs)"),
    ("--batch-decode-pixels", "batch_decode_pixels", int, "requests with at most this many pixels are decoded by the "
     "model thread with their batch; larger ones in the decode pool (default 65536; 0 = always the pool)"),
    ("--max-batch", "max_batch", int, "images per model call (default 64)"),
    ("--max-wait-ms", "max_wait_ms", float, "how long the first request of a batch waits for company (default 5 ms)"),
    ("--max-queue", "max_queue", int, "images queued for the model before 503 (1024)"),
    ("--max-inflight", "max_inflight", int, "concurrent API requests before 503 (256)"),
    ("--max-body-mb", "max_body_bytes", float, "largest request body in MB (default 20)"),
    ("--max-image-mp", "max_image_pixels", float, "largest image in megapixels (default 40)"),
    ("--max-request-mp", "max_request_pixels", float, "decoded megapixels per request, all images together, checked "
     "from their headers (default 40)"),
    ("--max-images", "max_images_per_request", int, "images per request (default 64)"),
    ("--max-k", "max_k", int, "largest k for search (default 1000, at most 100000)"),
    ("--compact-every", "compact_every", int, "stored writes between index snapshots (default 1000)"),
    ("--index-backend", "index_backend", str, "backend for a new index (default csr)"),
    ("--index-metric", "index_metric", str, "metric for a new index (default cosine)"),
    ("--thumbnail-px", "thumbnail_px", int, "thumbnail size stored for images added to the index (0 = none; "
     "default 48)"),
    ("--drift-false-alarm-rate", "drift_false_alarm_rate", float, "drift monitor: chance that one evaluation on "
     "in-distribution traffic alarms (default 1e-4)"),
)  # fmt: skip
SCALE = {"max_body_bytes": MB, "max_image_pixels": 1e6, "max_request_pixels": 1e6}  # MB and megapixels on the CLI
# index.milvus_cli's flags (their dests) -> the settings fields
MILVUS_FIELDS = {
    "milvus_uri": "milvus_uri",
    "milvus_token": "milvus_token",
    "collection": "milvus_collection",
    "milvus_index": "milvus_index",
    "milvus_timeout": "milvus_timeout_s",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (embed, search, items, OOD, web page)",
        description="Serve an exported model over HTTP: POST /v1/embed, /v1/search, /v1/ood, PUT/GET/DELETE "
        "/v1/items, /healthz, /readyz, /metrics, a web page at / and OpenAPI docs at /docs. Every setting can also "
        "be given as an environment variable LPJEPA_<SETTING> (LPJEPA_API_KEY, LPJEPA_MAX_BATCH, ...); flags win.",
    )
    p.add_argument("--model", required=True, type=Path, help="exported ONNX model (lpjepa export)")
    p.add_argument(
        "--index", type=Path, help="index directory (lpjepa index build); created empty when it does not exist"
    )
    for flag, field, kind, text in SETTING_FLAGS:
        how = {"action": kind} if isinstance(kind, str) else {"type": kind}
        p.add_argument(flag, dest=field, default=None, help=text, **how)
    p.add_argument(
        "--backend",
        choices=("csr", "faiss", "milvus"),
        help="csr/faiss: the index lives in this process (--index DIR, durable in DIR/serve.sqlite3); milvus: in the "
        "collection at --milvus-uri, and the server keeps no state of its own (same as --index-backend)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="server processes on the port (default 1); more than one needs no --index (embed/OOD only) or "
        "--backend milvus with an http:// uri, the only mode in which processes share the index",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_milvus_arguments(p, index_kind=True, timeout_s=5.0)
    p.set_defaults(func=run, **dict.fromkeys(MILVUS_FIELDS))  # not given: the environment or the settings' default


def build_settings(args: argparse.Namespace) -> Any:
    """The flags given over the LPJEPA_* environment over the defaults (serve/settings.py)."""
    from serve.settings import ServeSettings

    given = {field: getattr(args, field) for _, field, _, _ in SETTING_FLAGS}
    given.update({field: getattr(args, dest) for dest, field in MILVUS_FIELDS.items()})
    for field, scale in SCALE.items():
        if given[field] is not None:
            given[field] = int(given[field] * scale)
    given["index_backend"] = args.backend or args.index_backend
    return ServeSettings.with_env(model_path=args.model, index_dir=args.index, **given)


def run(args: argparse.Namespace) -> int:
    if (args.backend or args.index_backend) == "milvus" and not (args.milvus_uri or os.environ.get(MILVUS_URI_ENV)):
        raise CliError("--backend milvus needs --milvus-uri (a .db file or http://host:port)")
    settings = build_settings(args)
    reject_milvus_flags_without_backend(args, settings.index_backend)
    if settings.auth_reads and settings.api_key is None:
        raise CliError("--auth-reads needs --api-key (or LPJEPA_API_KEY)")
    if not settings.model_path.is_file():
        raise CliError(f"no model file at {settings.model_path} (export one with `lpjepa export`)")
    if settings.index_backend == "milvus" and settings.index_dir is not None:
        raise CliError("--index is for csr and faiss; with --backend milvus the index is --collection at --milvus-uri")
    # Several processes can serve one index only where the index lives outside them (a Milvus server); without
    # --index the server holds no state at all (embed and OOD only), so every process can answer every request.
    stateless = settings.index_dir is None and settings.index_backend != "milvus"
    milvus_server = settings.index_backend == "milvus" and "://" in str(settings.milvus_uri)
    if args.workers > 1 and not (stateless or milvus_server):
        raise CliError(
            "--workers > 1 needs no --index (embed/OOD only) or --backend milvus --milvus-uri http://HOST:PORT: a "
            "csr/faiss index, or a Milvus Lite file, lives in one process"
        )

    import uvicorn

    from export.runtime import ModelLoadError
    from serve.app import create_app
    from serve.embedding import load_runtime, load_scorer, open_store
    from serve.store import StoreError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(settings.host, settings.port)  # first: a taken port fails before the slow loading
    except OSError as err:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}") from err
    store = None
    try:
        try:
            runtime = load_runtime(settings)
        except (ModelLoadError, OSError) as err:
            raise CliError(f"cannot load model {settings.model_path}: {err}") from err
        try:
            scorer = load_scorer(runtime)
        except ValueError as err:
            raise CliError(f"the model's OOD calibration is unusable: {err}") from err
        try:
            store = open_store(settings, int(runtime.dim))
        except (StoreError, ValueError, OSError) as err:
            where = settings.index_dir if settings.index_backend != "milvus" else settings.milvus_collection
            raise CliError(f"cannot open index {where}: {err}") from err
        if args.workers > 1:  # checked: no index, or the index is in Milvus; each worker opens its own everything
            if store is not None:
                store.close()
                store = None
            return _run_workers(settings, sock, args)
        config = _uvicorn_config(create_app(settings, runtime=runtime, store=store, scorer=scorer), args)
        _say_listening(sock)
        # On SIGINT/SIGTERM uvicorn drains requests, runs the lifespan shutdown (index snapshot), then re-raises
        # the signal so the exit status says how the server ended.
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if store is not None:
            store.close()
    return 0


def _run_workers(settings, sock: socket.socket, args: argparse.Namespace) -> int:
    """uvicorn's own supervisor: N spawned processes on the one bound socket, each loading the model and opening
    the Milvus collection itself (serve.app.app_from_env), restarted by uvicorn if one dies."""
    from uvicorn.supervisors import Multiprocess

    from serve.app import SETTINGS_ENV

    if settings.model_threads is None:  # N processes x all cores each would oversubscribe the CPU
        settings = settings.model_copy(update={"model_threads": max(1, (os.cpu_count() or 1) // args.workers)})
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    config = _uvicorn_config("serve.app:app_from_env", args, factory=True, workers=args.workers)
    _say_listening(sock, f" ({args.workers} workers)")
    Multiprocess(config, sockets=[sock]).run()
    return 0


def _uvicorn_config(app: Any, args: argparse.Namespace, **extra: Any) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=10, access_log=args.log_level == "debug", **extra
    )


def _say_listening(sock: socket.socket, suffix: str = "") -> None:
    """One machine-readable line, flushed at once: scripts (and the tests) read the port from it with --port 0."""
    host, port = sock.getsockname()[:2]
    print(f"lpjepa serve: listening on http://{f'[{host}]' if ':' in host else host}:{port}{suffix}", flush=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so a taken port is a CliError and --port 0 reports the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock
