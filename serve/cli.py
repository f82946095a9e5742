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

from cli.argtypes import positive_int
from cli.errors import CliError
from index.milvus_cli import TOKEN_ENV as MILVUS_TOKEN_ENV
from index.milvus_cli import add_milvus_arguments, reject_milvus_flags_without_backend


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (embed, search, items, OOD, web page)",
        description="Serve an exported model over HTTP: POST /v1/embed, /v1/search, /v1/ood, PUT/GET/DELETE "
        "/v1/items, /healthz, /readyz, /metrics, a web page at / and OpenAPI docs at /docs.",
    )
    p.add_argument("--model", required=True, type=Path, help="exported ONNX model (lpjepa export)")
    p.add_argument(
        "--index",
        type=Path,
        default=None,
        help="index directory (lpjepa index build); created empty when it does not exist",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key", default=None, help="require Authorization: Bearer KEY for writes (default: $LPJEPA_API_KEY if set)"
    )
    p.add_argument("--auth-reads", action="store_true", help="require the API key for reads too")
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="one model call per request (the benchmark baseline)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per model call (default: all cores)")
    p.add_argument(
        "--model-spin",
        action="store_true",
        help="let ONNX Runtime's idle threads spin-wait (faster on dedicated cores; off by default: on a shared "
        "or small machine they take the cores HTTP needs)",
    )
    p.add_argument(
        "--batch-decode-pixels",
        type=int,
        default=65_536,
        help="requests with at most this many pixels are decoded by the model thread with their batch; larger ones "
        "in the decode pool (default 65536; 0 = always the pool)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per model call (default 64)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for company (default 5 ms)",
    )
    p.add_argument("--max-queue", type=int, default=1024, help="images queued for the model before 503 (1024)")
    p.add_argument("--max-inflight", type=int, default=256, help="concurrent API requests before 503 (256)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument("--max-image-mp", type=float, default=40.0, help="largest image in megapixels (default 40)")
    p.add_argument(
        "--max-request-mp",
        type=float,
        default=40.0,
        help="decoded megapixels per request, all images together, checked from their headers (default 40)",
    )
    p.add_argument("--max-images", type=int, default=64, help="images per request (default 64)")
    p.add_argument("--max-k", type=int, default=1000, help="largest k for search (default 1000, at most 100000)")
    p.add_argument(
        "--compact-every", type=int, default=1000, help="stored writes between index snapshots (default 1000)"
    )
    p.add_argument("--index-backend", default="csr", help="backend for a new index (default csr)")
    p.add_argument(
        "--backend",
        choices=("csr", "faiss", "milvus"),
        default=None,
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
    p.add_argument("--index-metric", default="cosine", help="metric for a new index (default cosine)")
    p.add_argument(
        "--thumbnail-px",
        type=int,
        default=48,
        help="thumbnail size stored for images added to the index (0 = none; default 48)",
    )
    p.add_argument(
        "--drift-false-alarm-rate",
        type=float,
        default=1e-4,
        help="drift monitor: chance that one evaluation on in-distribution traffic alarms (default 1e-4)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_milvus_arguments(p, index_kind=True, timeout_s=5.0)
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from serve.settings import ServeSettings

    try:
        return ServeSettings.with_env(
            model_path=args.model,
            index_dir=args.index,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            auth_reads=args.auth_reads,
            batching=args.batching,
            max_batch=args.max_batch,
            model_threads=args.threads,
            model_spin=args.model_spin,
            batch_decode_pixels=args.batch_decode_pixels,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_inflight=args.max_inflight,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_image_pixels=int(args.max_image_mp * 1e6),
            max_request_pixels=int(args.max_request_mp * 1e6),
            max_images_per_request=args.max_images,
            max_k=args.max_k,
            compact_every=args.compact_every,
            index_backend=args.backend or args.index_backend,
            index_metric=args.index_metric,
            milvus_uri=args.milvus_uri,
            milvus_token=args.milvus_token or os.environ.get(MILVUS_TOKEN_ENV) or None,
            milvus_collection=args.collection,
            milvus_index=args.milvus_index,
            milvus_timeout_s=args.milvus_timeout,
            thumbnail_px=args.thumbnail_px,
            drift_false_alarm_rate=args.drift_false_alarm_rate,
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise CliError(f"invalid value for {field}: {first.get('msg')}") from err


def run(args: argparse.Namespace) -> int:
    reject_milvus_flags_without_backend(args, args.backend or args.index_backend)
    if (args.backend or args.index_backend) == "milvus" and not args.milvus_uri:
        raise CliError("--backend milvus needs --milvus-uri (a .db file or http://host:port)")
    settings = build_settings(args)
    if args.auth_reads and settings.api_key is None:
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
        app = create_app(settings, runtime=runtime, store=store, scorer=scorer)
        config = uvicorn.Config(
            app, log_level=args.log_level, timeout_graceful_shutdown=10, access_log=args.log_level == "debug"
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        # One machine-readable line, flushed at once: scripts (and the tests) read the port from it with --port 0.
        print(f"lpjepa serve: listening on http://{shown}:{port}", flush=True)
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
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from serve.app import SETTINGS_ENV

    if settings.model_threads is None:  # N processes x all cores each would oversubscribe the CPU
        settings = settings.model_copy(update={"model_threads": max(1, (os.cpu_count() or 1) // args.workers)})
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    config = uvicorn.Config(
        "serve.app:app_from_env",
        factory=True,
        workers=args.workers,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        access_log=args.log_level == "debug",
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lpjepa serve: listening on http://{shown}:{port} ({args.workers} workers)", flush=True)
    Multiprocess(config, sockets=[sock]).run()
    return 0


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
