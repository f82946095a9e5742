"""`lpjepa serve`: the HTTP API under uvicorn.

The model and index are loaded before the port is bound, so a wrong path or a dimension mismatch is a one-line
error (exit 2) rather than a traceback from inside the server's start-up.
"""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from cli.errors import CliError


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
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            max_inflight=args.max_inflight,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            max_image_pixels=int(args.max_image_mp * 1e6),
            max_request_pixels=int(args.max_request_mp * 1e6),
            max_images_per_request=args.max_images,
            max_k=args.max_k,
            compact_every=args.compact_every,
            index_backend=args.index_backend,
            index_metric=args.index_metric,
            thumbnail_px=args.thumbnail_px,
            drift_false_alarm_rate=args.drift_false_alarm_rate,
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise CliError(f"invalid value for {field}: {first.get('msg')}") from err


def run(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    if args.auth_reads and settings.api_key is None:
        raise CliError("--auth-reads needs --api-key (or LPJEPA_API_KEY)")
    if not settings.model_path.is_file():
        raise CliError(f"no model file at {settings.model_path} (export one with `lpjepa export`)")

    import uvicorn

    from export.runtime import ModelLoadError
    from serve.app import create_app, load_runtime, load_scorer, open_store
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
            raise CliError(f"cannot open index {settings.index_dir}: {err}") from err
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
