"""Reading request bodies: JSON (strict), multipart forms, form fields and client-supplied embeddings.

Every helper raises ApiError (or a strict-JSON error, serve/errors.py) with a 4xx status and a message naming the
offending field, so the handlers in serve/routers/ read like the API description and never produce a 500 for bad
input.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.validation import MAX_ID
from serve import strict_json
from serve.errors import ApiError, format_validation
from serve.schemas import MULTIPART, EmbeddingIn
from serve.settings import ServeSettings

JSON_TYPES = ("application/json",)
_ASCII_INT = re.compile(r"-?[0-9]{1,20}")  # int() would also take "١٢", " 12 " and "1_2"
F32_MAX = float(np.finfo(np.float32).max)
# Largest L2 norm of a stored or query vector: the product of two such norms is a finite float32, so every
# score and every stored (norm-scaled) value reads back as a number, never as inf or null.
MAX_VECTOR_NORM = 1e19


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """Parse a JSON body strictly (serve/strict_json.py): malformed JSON is 400; too deep, non-finite numbers,
    lone surrogates and schema violations are 422. The depth is bounded before anything recurses."""
    body = await request.body()
    if not body:
        raise ApiError(400, "malformed_json", "the request body is empty; expected a JSON object")
    obj = strict_loads(body, where="body")
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", format_validation(err)) from err


def strict_loads(
    data: bytes | str, *, where: str, max_depth: int = strict_json.MAX_BODY_DEPTH, field_code: str | None = None
) -> Any:
    """`field_code`: the JSON is one field of a well-formed (multipart) body, so every refusal is a 422 with it."""
    try:
        return strict_json.loads(data, where=where, max_depth=max_depth)
    except strict_json.JsonRejected as err:
        if field_code is None:
            raise
        raise ApiError(422, field_code, str(err)) from None


def content_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in JSON_TYPES:
        return "json"
    if ctype == MULTIPART:
        return "multipart"
    message = f"content type {ctype or 'none'} is not accepted; send application/json or multipart/form-data"
    raise ApiError(415, "unsupported_media_type", message)


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


async def form_files(form: Any, name: str, limits: ServeSettings) -> list[tuple[str, bytes]]:
    uploads = [u for u in form.getlist(name) if isinstance(u, UploadFile)]
    stray = [u for u in form.getlist(name) if not isinstance(u, UploadFile)]
    if stray:
        raise ApiError(422, "invalid_request", f"multipart field {name!r} must carry files, not text")
    if not uploads:
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
    """A form field integer: ASCII digits only (int() would accept Arabic-Indic digits, spaces, underscores)."""
    if text is None or text == "":
        return default
    if not _ASCII_INT.fullmatch(text):
        raise ApiError(422, "invalid_request", f"{name} must be an integer written in ASCII digits, got {text[:40]!r}")
    return int(text)


def check_k(k: int, limits: ServeSettings) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > limits.max_k:
        raise ApiError(422, "invalid_k", f"k must be an integer between 1 and {limits.max_k}, got {str(k)[:40]}")
    return k


def embedding_row(emb: EmbeddingIn, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a client embedding against the model: (sorted int32 indices, float32 values) without zeros."""

    def refuse(code: str, problem: str) -> ApiError:
        return ApiError(422, code, f"{where}: {problem}")

    if emb.dim is not None and emb.dim != dim:
        raise refuse("wrong_dimension", f"dim is {emb.dim} but the model has {dim} dimensions")
    if emb.dense is not None:
        if len(emb.dense) != dim:
            raise refuse(
                "wrong_dimension", f"dense embedding has {len(emb.dense)} values but the model has {dim} dimensions"
            )
        values = np.asarray(emb.dense, dtype=np.float64)
        indices = np.arange(dim, dtype=np.int64)
    else:
        indices = np.asarray(emb.indices, dtype=np.int64) if emb.indices else np.zeros(0, dtype=np.int64)
        values = np.asarray(emb.values, dtype=np.float64) if emb.values else np.zeros(0, dtype=np.float64)
        if indices.size and (indices.min() < 0 or indices.max() >= dim):
            bad = int(indices[(indices < 0) | (indices >= dim)][0])
            raise refuse("wrong_dimension", f"index {bad} is outside 0..{dim - 1}")
        if np.unique(indices).size != indices.size:
            raise refuse("invalid_embedding", "indices contain repeats")
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > F32_MAX):
        raise refuse("invalid_embedding", f"values must be finite float32 numbers (|v| <= {F32_MAX:.4g})")
    if np.any(values < 0):
        raise refuse("invalid_embedding", "values must be non-negative (the model's codes are rectified)")
    as32 = values.astype(np.float32)
    lost = (values != 0) & (as32 == 0)
    if np.any(lost):
        raise refuse("invalid_embedding", f"value {values[lost][0]:.3g} is below the float32 range (stored as 0)")
    norm = float(np.sqrt(np.sum(np.square(as32.astype(np.float64)))))
    if norm > MAX_VECTOR_NORM:
        raise refuse("invalid_embedding", f"the vector's L2 norm {norm:.3g} exceeds {MAX_VECTOR_NORM:.0e}")
    keep = values != 0
    order = np.argsort(indices[keep], kind="stable")
    return indices[keep][order].astype(np.int32), as32[keep][order]


def check_query(row: tuple[np.ndarray, np.ndarray], where: str) -> None:
    """An empty or all-zero query scores 0 against everything: the "neighbours" would be arbitrary ids."""
    if row[0].size == 0:
        raise ApiError(
            422, "empty_query", f"{where} has no non-zero values; an all-zero query matches nothing in particular"
        )


def check_id(item_id: int) -> None:
    if isinstance(item_id, bool) or not isinstance(item_id, int) or item_id < 0 or item_id > MAX_ID:
        raise ApiError(422, "invalid_id", f"ids are integers from 0 to {MAX_ID}, got {str(item_id)[:40]}")


def parse_ids(text: str | None, n: int) -> list[int]:
    """Multipart ids: a JSON list of integers or comma-separated ASCII integers; no booleans, strings or floats."""
    if text is None or not text.strip():
        raise ApiError(422, "missing_ids", "multipart PUT needs an 'ids' field: one id per file")
    shown = text[:80]
    if text.strip().startswith("["):
        raw = strict_loads(text, where="ids", max_depth=1, field_code="invalid_id")
        if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise ApiError(422, "invalid_id", f"ids must be a JSON list of integers, got {shown!r}")
        ids = list(raw)
    else:
        tokens = [t.strip() for t in text.split(",") if t.strip()]
        if not all(_ASCII_INT.fullmatch(t) for t in tokens):
            raise ApiError(422, "invalid_id", f"ids must be integers (a JSON list or comma-separated), got {shown!r}")
        ids = [int(t) for t in tokens]
    if len(ids) != n:
        raise ApiError(422, "invalid_request", f"{len(ids)} ids for {n} files; give one id per file")
    for item_id in ids:
        check_id(item_id)
    return ids


def parse_payloads(text: str | None, n: int) -> list[dict[str, Any] | None]:
    if text is None or not text.strip():
        return [None] * n
    raw = strict_loads(
        text, where="payloads", max_depth=strict_json.MAX_PAYLOAD_DEPTH + 1, field_code="invalid_payload"
    )
    if not isinstance(raw, list) or len(raw) != n or not all(p is None or isinstance(p, dict) for p in raw):
        raise ApiError(422, "invalid_payload", f"payloads must be a JSON list of {n} objects (or nulls)")
    return raw
