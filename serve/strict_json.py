"""Strict, bounded JSON: what the server accepts it can store, read back and serve forever.

Python's json module recurses once per nesting level (a body nested 100,000 deep raises RecursionError), turns
``1e999`` into infinity, and accepts ``"\\ud800"``, a lone surrogate that no UTF-8 encoder can write back, so an
item holding one answered 500 on every later read. Here the nesting depth is measured on the raw bytes *before*
anything recurses (a linear scan with the strings removed), numbers must be finite, and every string (keys
included) must be valid Unicode; each refusal names where in the document it is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from core.errors import RejectedInput

MAX_PAYLOAD_DEPTH = 32  # nesting levels of a stored payload (an object is one level)
ENVELOPE_DEPTH = 8  # levels of a request body around a payload: {"items": [{"payload": ...}]} and some slack
MAX_BODY_DEPTH = MAX_PAYLOAD_DEPTH + ENVELOPE_DEPTH

# A JSON string: quote, then runs of ordinary characters separated by escapes (unrolled, so a 20 MB base64
# string is one fast character-class run, not one backtracking point per character).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points UTF-8 cannot encode
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class JsonRejected(RejectedInput):
    """Input that is not strict JSON, or JSON the server will not store; `code` names the reason (malformed_json,
    too_deep, invalid_number, invalid_unicode, invalid_payload, payload_too_large) and serve/errors.py its status."""

    code = "invalid_payload"


class MalformedJsonError(JsonRejected):
    """Not JSON at all (or not UTF-8)."""

    code = "malformed_json"


def nesting_depth(data: bytes) -> int:
    """Maximum bracket nesting outside strings, without parsing (so without recursion); O(len(data))."""
    stripped = _STRING.sub(b"", data)
    if not stripped:
        return 0
    steps = _OPEN[np.frombuffer(stripped, np.uint8)].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is outside the range of a double")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number (numbers must be finite)")


def loads(data: bytes | str, *, where: str = "body", max_depth: int = MAX_BODY_DEPTH) -> Any:
    """Parse strictly: 400 for malformed JSON, 422 for too deep, non-finite numbers or lone surrogates."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonRejected(f"{where}: contains a lone surrogate", "invalid_unicode") from None
    else:
        raw = data
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MalformedJsonError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JsonRejected(f"{where}: JSON nested {depth} levels deep; at most {max_depth} allowed", "too_deep")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise MalformedJsonError(
            f"{where}: malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except ValueError as err:  # non-finite numbers, integers with more than 4300 digits
        raise JsonRejected(f"{where}: {err}", "invalid_number") from None
    bad = first_bad_string(obj)
    if bad is not None:
        raise JsonRejected(f"{where}{bad}: contains a lone surrogate (not valid Unicode)", "invalid_unicode")
    return obj


def first_bad_string(obj: Any, path: str = "") -> str | None:
    """Path of the first string (or key) that cannot be encoded as UTF-8, or None. Depth is bounded by then."""
    if isinstance(obj, str):
        return None if _encodable(obj) else path or "(the value)"
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not _encodable(key):
                return f"{path}.<key>"
            found = first_bad_string(value, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = first_bad_string(value, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    return text.isascii() or not _SURROGATE.search(text)


def depth_of(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed value (an object or list is one level), counting no further than `limit` + 1."""
    if isinstance(obj, dict | list):
        if limit < 0:
            return 1
        children = obj.values() if isinstance(obj, dict) else obj
        return 1 + max((depth_of(v, limit - 1) for v in children), default=0)
    return 0


def check_payload_value(payload: Any, where: str, max_bytes: int) -> None:
    """A payload must be a JSON object (or null) no deeper than MAX_PAYLOAD_DEPTH and at most `max_bytes` long."""
    if payload is None:
        return
    if not isinstance(payload, dict):
        raise JsonRejected(f"{where}: must be a JSON object or null")
    depth = depth_of(payload, MAX_PAYLOAD_DEPTH)
    if depth > MAX_PAYLOAD_DEPTH:
        raise JsonRejected(f"{where}: nested more than {MAX_PAYLOAD_DEPTH} levels deep (at most allowed)")
    bad = first_bad_string(payload)
    if bad is not None:
        raise JsonRejected(f"{where}{bad}: contains a lone surrogate (not valid Unicode)")
    try:
        size = len(json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as err:
        raise JsonRejected(f"{where}: not strict JSON ({err})") from None
    if size > max_bytes:
        raise JsonRejected(f"{where}: {size} bytes of JSON exceeds the limit of {max_bytes}", "payload_too_large")
