"""Reading request bodies: JSON (strict), multipart forms, form fields and client-supplied embeddings.

Every helper raises ApiError with a 4xx status and a message naming the offending field, so the handlers in
serve/app.py read like the API description and never produce a 500 for bad input.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from scipy import sparse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.validation import MAX_ID
from serve.errors import ApiError, format_validation
from serve.schemas import EmbeddingIn
from serve.settings import ServeSettings

JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number (embeddings must be finite)")


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """Parse a JSON body strictly: malformed JSON is 400, NaN/Infinity and schema violations are 422."""
    body = await request.body()
    if not body:
        raise ApiError(400, "malformed_json", "the request body is empty; expected a JSON object")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise ApiError(400, "malformed_json", "the request body is not UTF-8 JSON") from err
    except json.JSONDecodeError as err:
        raise ApiError(
            400, "malformed_json", f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except ValueError as err:
        raise ApiError(422, "invalid_number", str(err)) from err
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", format_validation(err)) from err


def content_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in JSON_TYPES:
        return "json"
    if ctype == MULTIPART:
        return "multipart"
    shown = ctype or "none"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {shown} is not accepted; send application/json or multipart/form-data",
    )


async def read_form(request: Request, limits: ServeSettings) -> Any:
    try:
        return await request.form(
            max_files=limits.max_images_per_request, max_fields=1000, max_part_size=limits.max_body_bytes
        )
    except StarletteHTTPException as err:
        detail = str(err.detail)
        if detail.startswith("Too many files"):
            raise ApiError(
                413, "too_many_images", f"at most {limits.max_images_per_request} images per request"
            ) from err
        raise ApiError(400, "malformed_multipart", f"malformed multipart body: {detail}") from err


async def form_files(form: Any, name: str, limits: ServeSettings, *, required: bool = True) -> list[tuple[str, bytes]]:
    uploads = [u for u in form.getlist(name) if isinstance(u, UploadFile)]
    stray = [u for u in form.getlist(name) if not isinstance(u, UploadFile)]
    if stray:
        raise ApiError(422, "invalid_request", f"multipart field {name!r} must carry files, not text")
    if required and not uploads:
        raise ApiError(422, "missing_images", f"no images: send them as multipart file field {name!r}")
    if len(uploads) > limits.max_images_per_request:
        raise ApiError(413, "too_many_images", f"at most {limits.max_images_per_request} images per request")
    out = []
    for i, upload in enumerate(uploads):
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        where = f"file {i} ({upload.filename or 'unnamed'})"
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise ApiError(415, "unsupported_media_type", f"{where}: content type {ctype} is not an image type")
        out.append((where, await upload.read()))
    return out


def form_text(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise ApiError(422, "invalid_request", f"multipart field {name!r} must be text, not a file")
    return str(value)


def parse_bool(text: str | None, name: str, default: bool) -> bool:
    if text is None or text == "":
        return default
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ApiError(422, "invalid_request", f"{name} must be true or false, got {text!r}")


def parse_int(text: str | None, name: str, default: int) -> int:
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError as err:
        raise ApiError(422, "invalid_request", f"{name} must be an integer, got {text!r}") from err


def check_k(k: int, limits: ServeSettings) -> int:
    if k < 1 or k > limits.max_k:
        raise ApiError(422, "invalid_k", f"k must be between 1 and {limits.max_k}, got {k}")
    return k


def embedding_row(emb: EmbeddingIn, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a client embedding against the model: (sorted int32 indices, float32 values) without zeros."""
    if emb.dim is not None and emb.dim != dim:
        raise ApiError(422, "wrong_dimension", f"{where}: dim is {emb.dim} but the model has {dim} dimensions")
    if emb.dense is not None:
        if len(emb.dense) != dim:
            raise ApiError(
                422,
                "wrong_dimension",
                f"{where}: dense embedding has {len(emb.dense)} values but the model has {dim} dimensions",
            )
        values = np.asarray(emb.dense, dtype=np.float64)
        indices = np.arange(dim, dtype=np.int64)
    else:
        indices = np.asarray(emb.indices, dtype=np.int64) if emb.indices else np.zeros(0, dtype=np.int64)
        values = np.asarray(emb.values, dtype=np.float64) if emb.values else np.zeros(0, dtype=np.float64)
        if indices.size and (indices.min() < 0 or indices.max() >= dim):
            bad = int(indices[(indices < 0) | (indices >= dim)][0])
            raise ApiError(422, "wrong_dimension", f"{where}: index {bad} is outside 0..{dim - 1}")
        if np.unique(indices).size != indices.size:
            raise ApiError(422, "invalid_embedding", f"{where}: indices contain repeats")
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > np.finfo(np.float32).max):
        raise ApiError(422, "invalid_embedding", f"{where}: values must be finite float32 numbers")
    if np.any(values < 0):
        raise ApiError(
            422, "invalid_embedding", f"{where}: values must be non-negative (the model's codes are rectified)"
        )
    keep = values != 0
    order = np.argsort(indices[keep], kind="stable")
    return indices[keep][order].astype(np.int32), values[keep][order].astype(np.float32)


def rows_to_csr(rows: list[tuple[np.ndarray, np.ndarray]], dim: int) -> sparse.csr_matrix:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([r[0].size for r in rows])
    indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32)
    data = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), dim), dtype=np.float32)


def check_id(item_id: int) -> None:
    if item_id < 0 or item_id > MAX_ID:
        raise ApiError(422, "invalid_id", f"ids are integers from 0 to {MAX_ID}, got {item_id}")


def parse_ids(text: str | None, n: int) -> list[int]:
    if text is None or not text.strip():
        raise ApiError(422, "missing_ids", "multipart PUT needs an 'ids' field: one id per file")
    raw: Any
    try:
        raw = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
        ids = [int(v) for v in raw]
        if any(isinstance(v, float) and not float(v).is_integer() for v in raw):
            raise ValueError
    except (ValueError, TypeError) as err:
        raise ApiError(
            422, "invalid_id", f"ids must be integers (a JSON list or comma-separated), got {text!r}"
        ) from err
    if len(ids) != n:
        raise ApiError(422, "invalid_request", f"{len(ids)} ids for {n} files; give one id per file")
    for item_id in ids:
        check_id(item_id)
    return ids


def parse_payloads(text: str | None, n: int) -> list[dict[str, Any] | None]:
    if text is None or not text.strip():
        return [None] * n
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:
        raise ApiError(422, "invalid_payload", f"payloads must be a JSON list of objects: {err}") from err
    if not isinstance(raw, list) or len(raw) != n or not all(p is None or isinstance(p, dict) for p in raw):
        raise ApiError(422, "invalid_payload", f"payloads must be a JSON list of {n} objects (or nulls)")
    return raw


def check_payload(payload: dict[str, Any] | None, where: str, limit: int) -> None:
    if payload is None:
        return
    try:
        size = len(json.dumps(payload, allow_nan=False).encode())
    except ValueError as err:
        raise ApiError(422, "invalid_payload", f"{where}: not JSON-serialisable ({err})") from err
    if size > limit:
        raise ApiError(413, "payload_too_large", f"{where}: {size} bytes of JSON exceeds the limit of {limit}")
