"""The HTTP API: embedding, similarity search, index management and OOD scoring over one exported model.

`create_app(settings)` builds a self-contained app (own metrics registry, batcher, store) so tests can run several
in one process; the model and index are loaded in the lifespan, or passed in already loaded by `lpjepa serve`,
which loads them first so a bad path fails with a one-line message before the port is bound. It only wires the
parts: the routes live in serve/routers/ (one module per resource), what they share in serve/dependencies.py, the
error answers in serve/errors.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from serve.batching import DynamicBatcher
from serve.dependencies import ServeState, key_required
from serve.embedding import load_drift, load_runtime, load_scorer, model_runner, open_store
from serve.errors import install_error_handlers
from serve.limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from serve.metrics import MetricsMiddleware, ServeMetrics
from serve.routers import embed, items, ood, ops, search
from serve.schemas import REQUEST_MODELS
from serve.settings import ServeSettings
from serve.store import ItemStore

log = logging.getLogger("lpjepa.serve")
SETTINGS_ENV = "LPJEPA_SERVE_SETTINGS"  # `lpjepa serve --workers N` hands each worker its settings as JSON here


def create_app(
    settings: ServeSettings, *, runtime: Any = None, store: ItemStore | None = None, scorer: Any = None
) -> FastAPI:
    """Build the app. `runtime`/`store`/`scorer` may be passed already loaded; otherwise the lifespan loads them."""
    metrics = ServeMetrics()
    state = ServeState(settings=settings, metrics=metrics, runtime=runtime, store=store, scorer=scorer)
    app = FastAPI(
        title="Rectified LpJEPA embedding server",
        version=ops.server_version(),
        description="Sparse image embeddings, similarity search, index management and OOD scoring. "
        'Every error is JSON: {"error": {"code", "message"}}.',
        lifespan=_lifespan,
    )
    app.state.serve = state
    install_error_handlers(app)
    app.add_middleware(ConcurrencyLimitMiddleware, max_inflight=settings.max_inflight)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413/503 refusals too
    reads, writes = key_required(settings, reads=True), key_required(settings, reads=False)
    app.include_router(ops.router)
    app.mount("/static", StaticFiles(directory=ops.STATIC_DIR), name="static")
    for router in (ops.read_router, embed.router, ood.router, search.router, items.router):
        app.include_router(router, **reads)
    app.include_router(items.write_router, **writes)
    _install_openapi(app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load what was not passed in, start the batcher; on shutdown drain, then snapshot the index."""
    state: ServeState = app.state.serve
    settings, metrics = state.settings, state.metrics
    if settings.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(settings.blas_threads, user_api="blas")  # process-wide, for the server's lifetime
    if state.runtime is None:
        state.runtime = await anyio.to_thread.run_sync(load_runtime, settings)
    if state.scorer is None:
        state.scorer = load_scorer(state.runtime)
    if state.drift is None:
        state.drift = load_drift(state.scorer, settings)
    if state.drift is not None:
        metrics.attach_drift(state.drift)
    if state.store is None and settings.has_index:
        state.store = await anyio.to_thread.run_sync(open_store, settings, state.dim, metrics)
    if state.store is not None:
        state.store.metrics = metrics
        metrics.index_size.set(len(state.store))
    state.batcher = DynamicBatcher(
        model_runner(state),
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        enabled=settings.batching,
        observer=metrics,
    )
    await state.batcher.start()
    state.draining = False
    # What start-up loaded (modules, the model, the index: ~200,000 tracked objects) leaves the collector's
    # generations: otherwise every full collection under load walks all of it, a pause on the event loop that
    # lands in the tail latency of every request in flight. Measured on the demo server under wrk (32 clients,
    # 10 s, a shared machine): 4 full collections, up to 427 ms each, before; at most 2.3 ms after. /metrics
    # has the pauses (lpjepa_gc_pause_seconds).
    gc.collect()
    gc.freeze()
    metrics.watch_gc()
    try:
        yield
    finally:
        metrics.unwatch_gc()
        gc.unfreeze()  # back to the oldest generation: an in-process app (tests) can be collected after it
        state.draining = True
        await state.batcher.stop()
        if state.store is not None:
            # Snapshot + empty WAL at a clean shutdown, so the next start has nothing to replay.
            await anyio.to_thread.run_sync(state.store.close)


def app_from_env() -> FastAPI:
    """The app of one `lpjepa serve --workers N` process (uvicorn factory): settings from $LPJEPA_SERVE_SETTINGS,
    model and Milvus collection opened in the lifespan."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(ServeSettings.model_validate_json(os.environ[SETTINGS_ENV]))


def _install_openapi(app: FastAPI) -> None:
    """Add the JSON request models the routes reference by $ref (they are parsed by hand, so FastAPI misses them)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            schema = original()
            _, defs = models_json_schema(
                [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
