"""Operations: the web page, liveness, readiness, Prometheus metrics, and the server's state (/v1/info, /v1/drift).

`router` is always open (probes and scrapers carry no key); `read_router` is a read like any other.
"""

from __future__ import annotations

import contextlib
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from index.errors import BackendUnavailableError
from serve.dependencies import ServeState, State
from serve.schemas import DriftResponse, ErrorResponse, Health, IndexInfo, InfoResponse, error_docs

STATIC_DIR = Path(__file__).parents[1] / "static"
router = APIRouter(tags=["ops"])
read_router = APIRouter()


def server_version() -> str:
    try:
        return importlib_metadata.version("rectified-lpjepa")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


@router.get("/", include_in_schema=False)
async def index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: model and index loaded",
    responses={503: {"model": ErrorResponse}},
)
async def readyz(state: State) -> Any:
    checks = {
        "model": state.runtime is not None,
        "batcher": state.batcher is not None and state.batcher.alive,
        "index": not state.settings.has_index or state.store is not None,
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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(state: State) -> Response:
    if state.store is not None:
        with contextlib.suppress(BackendUnavailableError):  # metrics stay scrapeable while Milvus is down
            state.metrics.index_size.set(await anyio.to_thread.run_sync(len, state.store))
    payload, ctype = state.metrics.render()
    return Response(payload, media_type=ctype)


@read_router.get(
    "/v1/info", tags=["model"], summary="Model metadata, index state and limits", responses=error_docs(503)
)
async def info(state: State) -> InfoResponse:
    state.ready()
    # The calibration itself (per-dimension rates, l0 knots) is large and internal: summarise it instead.
    meta = {k: v for k, v in (getattr(state.runtime, "metadata", {}) or {}).items() if k != "ood_calibration"}
    index_info = None
    if state.store is not None:
        index_info = IndexInfo(**await anyio.to_thread.run_sync(state.store.describe))
    target_l0 = meta.get("expected_l0")
    return InfoResponse(
        model=meta,
        dim=state.dim,
        ood_calibrated=state.scorer is not None,
        ood=_ood_summary(state),
        index=index_info,
        target_l0=float(target_l0) if isinstance(target_l0, int | float) else None,
        index_size=None if index_info is None else index_info.size,
        backend=None if index_info is None else index_info.backend,
        limits=state.settings.public_limits(),
        version=server_version(),
    )


def _ood_summary(state: ServeState) -> dict[str, Any] | None:
    if state.scorer is None:
        return None
    cal = state.scorer.calibration or {}
    return {
        "served": state.scorer.score_name,
        "threshold": float(state.scorer.threshold),
        "tpr": state.scorer.tpr,
        "scores": state.scorer.names,
        "reason": (cal.get("selection") or {}).get("reason"),
        "drift": state.drift is not None,
        **{key: cal[key] for key in ("created", "n", "source") if key in cal},
    }


@read_router.get(
    "/v1/drift",
    tags=["ood"],
    summary="Drift monitor: is recent embed/search/ood traffic still in-distribution?",
    responses=error_docs(503),
)
async def drift(state: State) -> DriftResponse:
    if state.drift is None:
        from ood.drift import disabled_snapshot

        meta = getattr(state.runtime, "metadata", {}) or {}
        return DriftResponse(**disabled_snapshot(state.settings.drift_false_alarm_rate, meta.get("expected_l0")))
    return DriftResponse(**state.drift.snapshot())
