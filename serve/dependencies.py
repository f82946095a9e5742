"""What the routes share, got through `Depends`: the app's state (model, store, batcher, OOD suite, drift monitor,
settings), the API key check and the per-request limits on the images a body may carry.

The state is one typed object on `app.state.serve`, so several apps (tests, workers) live in one process. Its
readiness checks are methods the handlers call first thing rather than dependencies, because FastAPI resolves
dependencies before it validates a route's own query and path parameters: as dependencies they would turn a 422
for a bad parameter into a 409/503 on a server without an index or still loading.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.batching import DynamicBatcher
from serve.errors import ApiError
from serve.images import PixelGate, decode_base64
from serve.metrics import ServeMetrics
from serve.parsing import content_kind, form_files, read_form, read_json
from serve.schemas import EmbedJSON, ErrorResponse
from serve.settings import ServeSettings
from serve.store import ItemStore

BEARER = HTTPBearer(auto_error=False, description="API key as a bearer token (lpjepa serve --api-key)")


@dataclass
class ServeState:
    """Everything a request handler needs; one per app."""

    settings: ServeSettings
    metrics: ServeMetrics
    runtime: Any = None
    scorer: Any = None  # ood.suite.ScoreSuite when the model carries an OOD calibration
    store: ItemStore | None = None
    batcher: DynamicBatcher | None = None
    draining: bool = False
    pixel_gate: PixelGate | None = None
    drift: Any = None  # ood.drift.DriftMonitor when the calibration has a drift section

    def __post_init__(self) -> None:
        if self.pixel_gate is None:
            self.pixel_gate = PixelGate(self.settings.concurrent_decodes * self.settings.max_request_pixels)

    @property
    def dim(self) -> int:
        return int(self.runtime.dim)

    def ready(self) -> None:
        """503 + Retry-After while the model loads or the server drains."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})
        if self.runtime is None or self.batcher is None:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})

    def need_store(self) -> ItemStore:
        self.ready()
        if self.store is None:
            raise ApiError(409, "no_index", "this server has no index; start it with lpjepa serve --index DIR")
        return self.store

    def need_scorer(self) -> Any:
        if self.scorer is None:
            message = "the model carries no OOD calibration; run `lpjepa ood calibrate` on the model first"
            raise ApiError(409, "ood_uncalibrated", message)
        return self.scorer


async def get_state(request: Request) -> ServeState:
    # async: FastAPI runs a plain-def dependency in the thread pool, a hand-off that costs every request ~0.1 ms
    return request.app.state.serve


State = Annotated[ServeState, Depends(get_state)]


async def require_key(state: State, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """401 unless the request carries the server's API key (compared in constant time)."""
    key = state.settings.api_key
    if key is None:
        return
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(
            401, "unauthorized", "missing API key: send Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(creds.credentials.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def key_required(settings: ServeSettings, *, reads: bool) -> dict[str, Any]:
    """`include_router` arguments for the routes of one kind (reads or writes): the key check and its documented
    401 where the settings demand a key, nothing otherwise (an open route that advertises auth misleads clients,
    and is a contract violation schemathesis reports)."""
    if settings.api_key is None or (reads and not settings.auth_reads):
        return {}
    return {
        "dependencies": [Depends(require_key)],
        "responses": {401: {"model": ErrorResponse, "description": "missing or wrong API key"}},
    }


async def request_images(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """The images (multipart field `files`, or JSON `images`) and the parsed body: {"form": ...} or {"json": ...}."""
    if content_kind(request) == "multipart":
        form = await read_form(request, settings)
        return await form_files(form, "files", settings), {"form": form}
    body = await read_json(request, EmbedJSON)
    if len(body.images) > settings.max_images_per_request:
        raise ApiError(413, "too_many_images", f"at most {settings.max_images_per_request} images per request")
    return [(f"images[{i}]", decode_base64(s, f"images[{i}]")) for i, s in enumerate(body.images)], {"json": body}
