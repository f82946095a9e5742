"""One error shape for every failure: {"error": {"code": ..., "message": ...}}, and one table from errors to statuses.

Clients (and the web page) branch on `code` and show `message`; FastAPI's defaults mix {"detail": str} and
{"detail": [validation items]}, so every path, including validation and unexpected exceptions, is routed here.

The domain code raises `core.errors.LpjepaError` subclasses that say nothing about HTTP; `HTTP_ERRORS` below is the
one place that decides which status and code a client gets for each. Only the HTTP layer itself (routers,
dependencies, request parsing) raises `ApiError`, which names its status directly.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InvalidError, LpjepaError, RejectedInput, UnavailableError
from export.errors import ImageDecodeError, ModelLoadError
from index.errors import BackendUnavailableError, DimensionMismatchError, IndexError_, UnknownIdError
from ood.scores import CalibrationError
from serve import batching, images, strict_json
from serve import durable_log as db

log = logging.getLogger("lpjepa.serve")


class ApiError(LpjepaError):
    """A refusal the HTTP layer decides itself (auth, readiness, a malformed request): it names its status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# error class -> (HTTP status, error code). The most specific class in an error's MRO wins; every 503 carries
# Retry-After (RETRY_AFTER_S, 1 s unless listed).
HTTP_ERRORS: dict[type[BaseException], tuple[int, str]] = {
    # the batcher and the decode gate
    batching.OverloadedError: (503, "overloaded"),
    images.DecodeBusyError: (503, "overloaded"),
    batching.ShuttingDownError: (503, "shutting_down"),
    batching.ModelFailedError: (500, "model_error"),
    # the store and its database
    db.StoreClosedError: (503, "shutting_down"),
    db.StoreUnavailableError: (503, "storage_error"),
    **{cls: (status, cls.code) for cls, status in ((db.StoreLockedError, 409), (db.CorruptStoreError, 500))},
    **{cls: (422, cls.code) for cls in (db.WrongDimensionError, db.StoreError)},
    # uploaded images and strict JSON: the error names its reason (`code`), REASON_STATUS its status
    images.ImageRejected: (422, "invalid_image"),
    strict_json.JsonRejected: (422, "invalid_payload"),
    # the other stages
    ImageDecodeError: (422, "invalid_image"),
    ModelLoadError: (503, "loading"),
    BackendUnavailableError: (503, "backend_unavailable"),  # Milvus down: a write that got this was not acknowledged
    DimensionMismatchError: (422, "wrong_dimension"),
    UnknownIdError: (404, "unknown_id"),
    IndexError_: (422, "invalid_request"),
    CalibrationError: (500, "ood_error"),
    # the families: what an error no row above names gets
    UnavailableError: (503, "unavailable"),
    InvalidError: (422, "invalid_request"),
    LpjepaError: (500, "internal_error"),
}
RETRY_AFTER_S = {BackendUnavailableError: 2}  # Milvus needs longer than our own queues to come back
# The reasons (RejectedInput.code: images, strict JSON) whose status is not their row's 422.
REASON_STATUS = {
    "unsupported_image_format": 415,
    "image_too_large": 413,
    "too_many_pixels": 413,
    "too_many_images": 413,
    "malformed_json": 400,
    "payload_too_large": 413,
}


def http_error(exc: LpjepaError) -> tuple[int, str, dict[str, str]]:
    """(status, code, headers) of a product error."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.headers
    kind = next(cls for cls in type(exc).__mro__ if cls in HTTP_ERRORS)
    status, code = HTTP_ERRORS[kind]
    if isinstance(exc, RejectedInput):
        status, code = REASON_STATUS.get(exc.code, status), exc.code
    headers = {"Retry-After": str(RETRY_AFTER_S.get(kind, 1))} if status == 503 else {}
    return status, code, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def format_validation(err: RequestValidationError) -> str:
    parts = []
    for item in err.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {item.get('msg', 'invalid')}")
    more = len(err.errors()) - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LpjepaError)
    async def _product_error(request: Request, exc: LpjepaError) -> JSONResponse:
        status, code, headers = http_error(exc)
        if status >= 500:
            log.warning("%s on %s %s: %s", code, request.method, request.url.path, exc)
        return error_response(status, code, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", format_validation(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")
