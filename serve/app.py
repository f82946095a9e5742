"""The HTTP API: embedding, similarity search, index management and OOD scoring over one exported model.

`create_app(settings)` builds a self-contained app (own metrics registry, batcher, store) so tests can run several
in one process; the model and index are loaded in the lifespan, or passed in already loaded by `lpjepa serve`,
which loads them first so a bad path fails with a one-line message before the port is bound.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as FastApiPath
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from index.errors import BackendUnavailableError
from index.validation import MAX_ID
from serve.batching import DynamicBatcher
from serve.embedding import (
    ServeState,
    dense_to_outputs,
    embed_blobs,
    embedding_out,
    load_drift,
    load_runtime,
    load_scorer,
    model_runner,
    open_store,
)
from serve.errors import ApiError, install_error_handlers
from serve.images import decode_base64
from serve.limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from serve.metrics import MetricsMiddleware, ServeMetrics
from serve.parsing import (
    MULTIPART,
    check_id,
    check_k,
    check_payload,
    check_query,
    content_kind,
    embedding_row,
    form_files,
    form_text,
    parse_bool,
    parse_ids,
    parse_int,
    parse_payloads,
    read_form,
    read_json,
    rows_to_csr,
)
from serve.schemas import (
    DeleteResponse,
    DriftResponse,
    EmbeddingIn,
    EmbedJSON,
    EmbedResponse,
    ErrorResponse,
    Health,
    IndexInfo,
    InfoResponse,
    ItemOut,
    OODOut,
    OODResponse,
    PutItemsJSON,
    PutItemsResponse,
    SearchHit,
    SearchJSON,
    SearchResponse,
)
from serve.settings import ServeSettings
from serve.store import ItemStore

log = logging.getLogger("lpjepa.serve")
STATIC_DIR = Path(__file__).parent / "static"
BACKEND_RETRY_AFTER_S = 2  # Retry-After of a 503 when Milvus does not answer
# Module level: with postponed annotations FastAPI resolves `Depends(BEARER)` in the module's namespace.
PathItemId = Annotated[int, FastApiPath(ge=0, le=MAX_ID, description="item id, 0 .. 2**63-2")]
BEARER = HTTPBearer(auto_error=False, description="API key as a bearer token (lpjepa serve --api-key)")


def _version() -> str:
    try:
        return importlib_metadata.version("rectified-lpjepa")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


# ------------------------------------------------------------------------------------------ openapi helpers
IMAGE_FILES_SCHEMA = {"type": "array", "items": {"type": "string", "format": "binary"}}


def body_doc(json_model: type[BaseModel] | None, multipart: dict[str, Any] | None) -> dict[str, Any]:
    """Document both accepted body encodings of a route (FastAPI can declare only one natively)."""
    content: dict[str, Any] = {}
    if json_model is not None:
        content["application/json"] = {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}
    if multipart is not None:
        content[MULTIPART] = {"schema": {"type": "object", "properties": multipart}}
    return {"requestBody": {"required": True, "content": content}}


ERROR_DESCRIPTIONS = {
    400: "malformed body (not JSON, not UTF-8, broken multipart)",
    401: "missing or wrong API key",
    404: "no item with this id",
    409: "this server has no index, or the model no OOD calibration",
    413: "body, image, pixel budget, payload or count over a limit",
    415: "unsupported content or image type",
    422: "invalid input (the message names the field)",
    503: "overloaded, loading or shutting down (Retry-After)",
}


def error_docs(*statuses: int, auth: bool = False) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route: exactly the error statuses it can answer (401 only where a key is due)."""
    wanted = sorted({*statuses, *((401,) if auth else ())})
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in wanted}


# ------------------------------------------------------------------------------------------ the app
def create_app(
    settings: ServeSettings, *, runtime: Any = None, store: ItemStore | None = None, scorer: Any = None
) -> FastAPI:
    """Build the app. `runtime`/`store`/`scorer` may be passed already loaded; otherwise the lifespan loads them."""
    metrics = ServeMetrics()
    state = ServeState(settings=settings, metrics=metrics, runtime=runtime, store=store, scorer=scorer)
    if store is not None:
        store.metrics = metrics
        metrics.index_size.set(len(store))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
        try:
            yield
        finally:
            state.draining = True
            await state.batcher.stop()
            if state.store is not None:
                # Snapshot + empty WAL at a clean shutdown, so the next start has nothing to replay.
                await anyio.to_thread.run_sync(state.store.close)

    app = FastAPI(
        title="Rectified LpJEPA embedding server",
        version=_version(),
        description="Sparse image embeddings, similarity search, index management and OOD scoring. "
        'Every error is JSON: {"error": {"code", "message"}}.',
        lifespan=lifespan,
    )
    app.state.serve = state
    install_error_handlers(app)

    app.add_middleware(ConcurrencyLimitMiddleware, max_inflight=settings.max_inflight)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413/503 refusals too

    def _check_key(creds: HTTPAuthorizationCredentials | None) -> None:
        import hmac

        key = settings.api_key
        if key is None:
            return
        if creds is None or creds.scheme.lower() != "bearer":
            raise ApiError(
                401, "unauthorized", "missing API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(creds.credentials.encode(), key.encode()):
            raise ApiError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def require_write(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        _check_key(creds)

    async def require_read(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if settings.auth_reads:
            _check_key(creds)

    # Declare the bearer scheme only on the routes that check it: an open route that advertises auth misleads
    # clients (and is a contract violation schemathesis reports).
    auth_writes = settings.api_key is not None
    auth_reads = auth_writes and settings.auth_reads
    read_deps = [Depends(require_read)] if auth_reads else []
    write_deps = [Depends(require_write)] if auth_writes else []

    def ready_or_503() -> None:
        if state.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})
        if state.runtime is None or state.batcher is None:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})

    def need_store() -> ItemStore:
        ready_or_503()
        if state.store is None:
            raise ApiError(409, "no_index", "this server has no index; start it with lpjepa serve --index DIR")
        return state.store

    def need_scorer() -> Any:
        if state.scorer is None:
            raise ApiError(
                409,
                "ood_uncalibrated",
                "the model carries no OOD calibration; run `lpjepa ood calibrate` on the model first",
            )
        return state.scorer

    async def request_images(request: Request, *, field_name: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
        """Images and extra options from either body encoding; JSON `images` or a single `image`."""
        kind = content_kind(request)
        if kind == "multipart":
            form = await read_form(request, settings)
            return await form_files(form, field_name, settings), {"form": form}
        if field_name == "files":
            body = await read_json(request, EmbedJSON)
            if len(body.images) > settings.max_images_per_request:
                raise ApiError(413, "too_many_images", f"at most {settings.max_images_per_request} images per request")
            blobs = [(f"images[{i}]", decode_base64(s, f"images[{i}]")) for i, s in enumerate(body.images)]
            return blobs, {"json": body}
        raise AssertionError(field_name)

    # -------------------------------------------------------------------------------- open endpoints
    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["ops"],
        summary="Readiness: model and index loaded",
        responses={503: {"model": ErrorResponse}},
    )
    async def readyz() -> Any:
        checks = {
            "model": state.runtime is not None,
            "batcher": state.batcher is not None and state.batcher.alive,
            "index": not settings.has_index or state.store is not None,
            "accepting": not state.draining,
        }
        if state.store is not None and state.store.backend_durable:
            try:  # the index lives in Milvus: ready only while it answers
                await anyio.to_thread.run_sync(state.store.ping)
                checks["backend"] = True
            except BackendUnavailableError:
                checks["backend"] = False
        if all(checks.values()):
            return Health(status="ready", checks=checks)
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        return JSONResponse(
            {"error": {"code": "not_ready", "message": f"not ready: {failing}"}, "checks": checks},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        if state.store is not None:
            with contextlib.suppress(BackendUnavailableError):  # metrics stay scrapeable while Milvus is down
                metrics.index_size.set(await anyio.to_thread.run_sync(len, state.store))
        payload, ctype = metrics.render()
        return Response(payload, media_type=ctype)

    # -------------------------------------------------------------------------------- reads
    @app.get(
        "/v1/info",
        response_model=InfoResponse,
        tags=["model"],
        dependencies=read_deps,
        summary="Model metadata, index state and limits",
        responses=error_docs(503, auth=auth_reads),
    )
    async def info() -> InfoResponse:
        ready_or_503()
        # The calibration itself (per-dimension rates, l0 knots) is large and internal: summarise it instead.
        meta = {k: v for k, v in (getattr(state.runtime, "metadata", {}) or {}).items() if k != "ood_calibration"}
        ood_summary = None
        if state.scorer is not None:
            cal = state.scorer.calibration or {}
            ood_summary = {
                "served": state.scorer.score_name,
                "threshold": float(state.scorer.threshold),
                "tpr": state.scorer.tpr,
                "scores": state.scorer.names,
                "reason": (cal.get("selection") or {}).get("reason"),
                "drift": state.drift is not None,
                **{key: cal[key] for key in ("created", "n", "source") if key in cal},
            }
        index_info = None
        if state.store is not None:
            index_info = IndexInfo(**await anyio.to_thread.run_sync(state.store.describe))
        target_l0 = meta.get("expected_l0")
        return InfoResponse(
            model=meta,
            dim=state.dim,
            ood_calibrated=state.scorer is not None,
            ood=ood_summary,
            index=index_info,
            target_l0=float(target_l0) if isinstance(target_l0, int | float) else None,
            index_size=None if index_info is None else index_info.size,
            backend=None if index_info is None else index_info.backend,
            limits=settings.public_limits(),
            version=_version(),
        )

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        tags=["model"],
        dependencies=read_deps,
        summary="Sparse embeddings (and OOD scores) of one or many images",
        openapi_extra=body_doc(EmbedJSON, {"files": IMAGE_FILES_SCHEMA, "dense": {"type": "boolean"}}),
        responses=error_docs(400, 413, 415, 422, 503, auth=auth_reads),
    )
    async def embed(request: Request, dense: bool | None = Query(None, description="also return dense vectors")):
        ready_or_503()
        blobs, extra = await request_images(request, field_name="files")
        want_dense = bool(dense)
        if "json" in extra:
            want_dense = want_dense or extra["json"].dense
        else:
            want_dense = want_dense or parse_bool(form_text(extra["form"], "dense"), "dense", False)
        out = await embed_blobs(state, blobs)
        return EmbedResponse(embeddings=dense_to_outputs(state, out.dense, want_dense, out.features, out.ood))

    @app.post(
        "/v1/ood",
        response_model=OODResponse,
        tags=["ood"],
        dependencies=read_deps,
        summary="OOD scores of one or many images (needs a calibrated model)",
        openapi_extra=body_doc(EmbedJSON, {"files": IMAGE_FILES_SCHEMA}),
        responses=error_docs(400, 409, 413, 415, 422, 503, auth=auth_reads),
    )
    async def ood(request: Request):
        ready_or_503()
        scorer = need_scorer()
        blobs, _ = await request_images(request, field_name="files")
        out = await embed_blobs(state, blobs)
        records = out.ood or []
        return OODResponse(
            results=[OODOut(**r) for r in records],
            score_name=scorer.score_name,
            threshold=float(scorer.threshold),
            tpr=scorer.tpr,
        )

    @app.get(
        "/v1/drift",
        response_model=DriftResponse,
        tags=["ood"],
        dependencies=read_deps,
        summary="Drift monitor: is recent embed/search/ood traffic still in-distribution?",
        responses=error_docs(503, auth=auth_reads),
    )
    async def drift() -> DriftResponse:
        if state.drift is None:
            from ood.drift import disabled_snapshot

            meta = getattr(state.runtime, "metadata", {}) or {}
            return DriftResponse(**disabled_snapshot(settings.drift_false_alarm_rate, meta.get("expected_l0")))
        return DriftResponse(**state.drift.snapshot())

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        tags=["index"],
        dependencies=read_deps,
        summary="Nearest items to an image or an embedding, best first",
        openapi_extra=body_doc(
            SearchJSON,
            {
                "file": {"type": "string", "format": "binary"},
                "k": {"type": "integer"},
                "thumbnails": {"type": "boolean"},
            },
        ),
        responses=error_docs(400, 409, 413, 415, 422, 503, auth=auth_reads),
    )
    async def search(
        request: Request,
        k: int | None = Query(None, description="number of neighbours"),
        thumbnails: bool | None = Query(None),
    ):
        if k is not None:  # FastAPI's int would also take "1_0"; the raw text must be ASCII digits
            k = parse_int(request.query_params.get("k"), "k", 10)
        store = need_store()
        kind = content_kind(request)
        query_out = None
        if kind == "multipart":
            form = await read_form(request, settings)
            blobs = await form_files(form, "file", settings)
            if len(blobs) != 1:
                raise ApiError(422, "invalid_request", f"search takes one image in field 'file', got {len(blobs)}")
            k_value = k if k is not None else parse_int(form_text(form, "k"), "k", 10)
            want_thumbs = (
                thumbnails if thumbnails is not None else parse_bool(form_text(form, "thumbnails"), "thumbnails", False)
            )
            image_blobs = blobs
            row = None
        else:
            body = await read_json(request, SearchJSON)
            k_value = k if k is not None else body.k
            want_thumbs = thumbnails if thumbnails is not None else body.thumbnails
            image_blobs = [("image", decode_base64(body.image, "image"))] if body.image is not None else None
            row = None if body.embedding is None else embedding_row(body.embedding, state.dim, "embedding")
        check_k(k_value, settings)
        if row is not None:
            check_query(row, "the query embedding")
        if image_blobs is not None:
            embedded = await embed_blobs(state, image_blobs)
            vectors = embedded.dense
            query_out = dense_to_outputs(state, vectors, False, embedded.features, embedded.ood)[0]
            idx = np.flatnonzero(vectors[0])
            row = (idx.astype(np.int32), vectors[0][idx])
            check_query(row, "the query image's embedding")
        assert row is not None
        query = rows_to_csr([row], state.dim)
        hits = await anyio.to_thread.run_sync(store.search, query, k_value, want_thumbs)
        results = [
            SearchHit(
                id=h.id,
                score=h.score,
                payload=h.payload,
                thumbnail=None if h.thumbnail is None else base64.b64encode(h.thumbnail).decode(),
            )
            for h in hits
        ]
        return SearchResponse(results=results, query=query_out)

    @app.get(
        "/v1/items/{item_id}",
        response_model=ItemOut,
        tags=["index"],
        dependencies=read_deps,
        summary="One stored item: payload, embedding and thumbnail",
        responses=error_docs(404, 409, 422, 503, auth=auth_reads),
    )
    async def get_item(request: Request, item_id: PathItemId, thumbnail: bool = Query(True)):
        store = need_store()
        item_id = parse_int(request.path_params["item_id"], "item_id", 0)
        check_id(item_id)
        item = await anyio.to_thread.run_sync(store.get, item_id)
        if item is None:
            raise ApiError(404, "unknown_id", f"no item with id {item_id}")
        emb = None
        if item.vector is not None:
            emb = embedding_out(item.vector[0], item.vector[1], state.dim)
        thumb = base64.b64encode(item.thumbnail).decode() if thumbnail and item.thumbnail is not None else None
        return ItemOut(id=item_id, payload=item.payload, embedding=emb, thumbnail=thumb)

    # -------------------------------------------------------------------------------- writes
    @app.put(
        "/v1/items",
        response_model=PutItemsResponse,
        tags=["index"],
        dependencies=write_deps,
        summary="Add or replace items (durable before the reply)",
        openapi_extra=body_doc(
            PutItemsJSON,
            {
                "files": IMAGE_FILES_SCHEMA,
                "ids": {"type": "string", "description": "JSON list or comma-separated ids, one per file"},
                "payloads": {"type": "string", "description": "optional JSON list of objects, one per file"},
            },
        ),
        responses=error_docs(400, 409, 413, 415, 422, 503, auth=auth_writes),
    )
    async def put_items(request: Request):
        store = need_store()
        kind = content_kind(request)
        if kind == "multipart":
            form = await read_form(request, settings)
            blobs = await form_files(form, "files", settings)
            ids = parse_ids(form_text(form, "ids"), len(blobs))
            payloads = parse_payloads(form_text(form, "payloads"), len(blobs))
            image_pos = list(range(len(blobs)))
            rows: list[Any] = [None] * len(blobs)
        else:
            body = await read_json(request, PutItemsJSON)
            if len(body.items) > settings.max_items_per_request:
                raise ApiError(413, "too_many_items", f"at most {settings.max_items_per_request} items per request")
            ids = [item.id for item in body.items]
            payloads = [item.payload for item in body.items]
            blobs, image_pos, rows = [], [], []
            for i, item in enumerate(body.items):
                if item.image is not None:
                    blobs.append((f"items[{i}].image", decode_base64(item.image, f"items[{i}].image")))
                    image_pos.append(i)
                    rows.append(None)
                else:
                    rows.append(embedding_row(item.embedding, state.dim, f"items[{i}].embedding"))
        if len(set(ids)) != len(ids):
            raise ApiError(422, "duplicate_ids", "the same id appears more than once in the request")
        for i, payload in enumerate(payloads):
            check_payload(payload, f"payload of item {ids[i]}", settings.max_payload_bytes)
        thumbs: list[bytes | None] = [None] * len(ids)
        if blobs:
            vectors, blob_thumbs, _, _ = await embed_blobs(
                state, blobs, thumbs=settings.thumbnail_px > 0, observe=False
            )
            for j, pos in enumerate(image_pos):
                nz = np.flatnonzero(vectors[j])
                rows[pos] = (nz.astype(np.int32), vectors[j][nz])
                thumbs[pos] = blob_thumbs[j]
        matrix = rows_to_csr(rows, state.dim)
        created, replaced = await anyio.to_thread.run_sync(
            store.upsert, np.asarray(ids, dtype=np.int64), matrix, payloads, thumbs
        )
        size = await anyio.to_thread.run_sync(len, store)  # a round trip when the index is remote
        return PutItemsResponse(ids=ids, created=created, replaced=replaced, index_size=size)

    @app.delete(
        "/v1/items/{item_id}",
        response_model=DeleteResponse,
        tags=["index"],
        dependencies=write_deps,
        summary="Delete one item (durable before the reply)",
        responses=error_docs(404, 409, 422, 503, auth=auth_writes),
    )
    async def delete_item(request: Request, item_id: PathItemId):
        store = need_store()
        item_id = parse_int(request.path_params["item_id"], "item_id", 0)
        check_id(item_id)
        deleted = await anyio.to_thread.run_sync(store.delete, item_id)
        if not deleted:
            raise ApiError(404, "unknown_id", f"no item with id {item_id}")
        size = await anyio.to_thread.run_sync(len, store)
        return DeleteResponse(id=item_id, deleted=True, index_size=size)

    _install_openapi(app)
    return app


SETTINGS_ENV = "LPJEPA_SERVE_SETTINGS"  # `lpjepa serve --workers N` hands each worker its settings as JSON here


def app_from_env() -> FastAPI:
    """The app of one `lpjepa serve --workers N` process (uvicorn factory): settings from $LPJEPA_SERVE_SETTINGS,
    model and Milvus collection opened in the lifespan."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(ServeSettings.model_validate_json(os.environ[SETTINGS_ENV]))


REQUEST_MODELS = (EmbedJSON, SearchJSON, PutItemsJSON, EmbeddingIn)


def _install_openapi(app: FastAPI) -> None:
    """Add the JSON request models the routes reference by $ref (they are parsed by hand, so FastAPI misses them)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        _, defs = models_json_schema(
            [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
