"""Checks on everything that enters an index, so that bad input fails loudly before any state changes.

Embeddings of this product are rectified (ReLU-like) codes: non-negative and finite. A negative or NaN entry
means the caller passed the wrong array (raw logits, a different model, an uninitialised buffer), and silently
indexing it would corrupt every later search, so both are rejected with the row that is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from index.errors import DimensionMismatchError, InvalidInputError
from index.thumbnails import MAX_THUMBNAIL_BYTES, PNG_SIGNATURE

METRICS = ("ip", "cosine")
# Ids are non-negative int64; -1 is the "no result" marker in search output (as in FAISS) and the largest
# int64 is kept free so that FAISS range selectors [0, MAX_ID] can exclude tombstones.
MAX_ID = int(np.iinfo(np.int64).max) - 1

Vectors = sp.csr_matrix | np.ndarray


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or int(dim) < 1:
        raise InvalidInputError(f"dimension must be a positive integer, got {dim!r}")
    return int(dim)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    return int(k)


def check_ids(ids: Any, *, what: str = "ids") -> np.ndarray:
    """Return ids as a 1-D int64 array of distinct values in [0, MAX_ID]."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInputError(f"{what} must be a 1-D sequence of integers, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass  # 3.0 is an acceptable spelling of 3 (JSON numbers arrive as floats)
        else:
            raise InvalidInputError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.max() > MAX_ID:
        raise InvalidInputError(f"{what} must be at most {MAX_ID}, got {int(arr.max())}")
    if arr.size and arr.dtype.kind == "f" and (arr.min() < 0 or arr.max() > MAX_ID):
        raise InvalidInputError(f"{what} must be in [0, {MAX_ID}]")
    out = arr.astype(np.int64, copy=False)
    if out.size and (out.min() < 0 or out.max() > MAX_ID):
        bad = out[(out < 0) | (out > MAX_ID)][:5].tolist()
        raise InvalidInputError(f"{what} must be in [0, {MAX_ID}]; got {bad}")
    if out.size > 1:
        uniq, counts = np.unique(out, return_counts=True)
        if uniq.size != out.size:
            dup = uniq[counts > 1][:5].tolist()
            raise InvalidInputError(f"{what} contain duplicates: {dup}; each id may appear once per call")
    return out


def check_vectors(vectors: Any, dim: int, *, what: str = "vectors", copy: bool = True) -> Vectors:
    """Return float32 vectors (CSR with int32 indices if sparse came in, else C-contiguous dense), checked.

    The input's form is kept because each backend has a preferred one and converting a 75%-dense batch to CSR
    only to densify it again for FAISS would waste time and memory. With ``copy=False`` (queries, which no
    index keeps or modifies) a float32 CSR matrix that is already clean and canonical comes back as it is:
    one compiled pass instead of scipy's copy and re-sort, most of a single query's cost otherwise.
    """
    if not copy and _clean_csr(vectors, dim):
        return vectors
    arr = vectors if sp.issparse(vectors) else _as_array(vectors, what)
    if arr.dtype.kind not in "fiub":
        raise InvalidInputError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{what} must be 2-D (rows of {dim} values), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have {arr.shape[1]} dimensions but the index dimension is {dim}")
    if not sp.issparse(arr):
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float32)
        _check_values(out, lambda bad: int(np.flatnonzero(bad.any(axis=1))[0]), what)
        return out
    csr = sp.csr_matrix(arr, dtype=np.float32, copy=True)
    if csr.nnz and (csr.indices.min() < 0 or csr.indices.max() >= dim):  # scipy does not check on construction
        raise InvalidInputError(f"{what} have column indices outside [0, {dim})")
    csr.sum_duplicates()  # canonical form: sorted, unique column indices per row
    _check_values(csr.data, lambda bad: int(np.searchsorted(csr.indptr, np.flatnonzero(bad)[0], "right") - 1), what)
    csr.eliminate_zeros()
    csr.indices = csr.indices.astype(np.int32, copy=False)
    if csr.nnz < np.iinfo(np.int32).max:
        csr.indptr = csr.indptr.astype(np.int32, copy=False)
    return csr


def _as_array(vectors: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(vectors)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"{what} must be a 2-D numeric array or a scipy sparse matrix: {err}") from None
    return arr.reshape(1, -1) if arr.ndim == 1 and arr.dtype.kind in "fiub" else arr


def _check_values(values: np.ndarray, first_row: Callable[[np.ndarray], int], what: str) -> None:
    """Refuse NaN, infinite and negative values, naming the first row (``first_row`` of a mask) holding one."""
    if not values.size:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise InvalidInputError(f"{what} contain NaN or infinite values (first in row {first_row(bad)})")
    if values.min() < 0:
        raise InvalidInputError(
            f"{what} contain negative values (first in row {first_row(values < 0)}, minimum {float(values.min()):.4g});"
            " embeddings must be non-negative"
        )


def _clean_csr(vectors: Any, dim: int) -> bool:
    if not (
        isinstance(vectors, sp.csr_matrix)
        and vectors.dtype == np.float32
        and vectors.indices.dtype == np.int32
        and vectors.indptr.dtype in (np.int32, np.int64)
        and vectors.shape[1] == dim
    ):
        return False
    from index.compiled import csr_problem  # numba: imported when a search first needs it

    return csr_problem(vectors.indptr, vectors.indices, vectors.data, dim) == 0


def n_rows(vectors: Vectors) -> int:
    return int(vectors.shape[0])


def check_payloads(payloads: Sequence[Any] | None, n: int) -> list[Any] | None:
    """Return JSON-round-tripped copies so that later mutation by the caller cannot change the index."""
    if payloads is None:
        return None
    if isinstance(payloads, str | bytes | dict) or not isinstance(payloads, Sequence):
        raise InvalidInputError("payloads must be a list with one JSON value (or None) per id")
    if len(payloads) != n:
        raise InvalidInputError(f"got {len(payloads)} payloads for {n} ids; pass one per id (None for none)")
    out: list[Any] = []
    for i, p in enumerate(payloads):
        if p is None:
            out.append(None)
            continue
        try:
            text = json.dumps(p, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"payload {i} is not JSON-serialisable: {err}") from None
        out.append(json.loads(text))
    return out


def check_thumbnails(thumbnails: Sequence[bytes | None] | None, n: int) -> list[bytes | None] | None:
    """One PNG (bytes) or None per id; anything else is refused before it reaches a backend."""
    if thumbnails is None:
        return None
    if isinstance(thumbnails, str | bytes | bytearray) or not isinstance(thumbnails, Sequence):
        raise InvalidInputError("thumbnails must be a list with one PNG (bytes, or None) per id")
    if len(thumbnails) != n:
        raise InvalidInputError(f"got {len(thumbnails)} thumbnails for {n} ids; pass one per id (None for none)")
    out: list[bytes | None] = []
    for i, thumb in enumerate(thumbnails):
        if thumb is None:
            out.append(None)
            continue
        if not isinstance(thumb, bytes | bytearray | memoryview):
            raise InvalidInputError(f"thumbnail {i} must be PNG bytes, got {type(thumb).__name__}")
        data = bytes(thumb)
        if not data.startswith(PNG_SIGNATURE):
            raise InvalidInputError(f"thumbnail {i} is not a PNG file")
        if len(data) > MAX_THUMBNAIL_BYTES:
            raise InvalidInputError(f"thumbnail {i} is {len(data)} bytes; at most {MAX_THUMBNAIL_BYTES} are stored")
        out.append(data)
    return out


def row_norms(vectors: Vectors) -> np.ndarray:
    """L2 norms per row in float64 accumulation, returned as float32."""
    if sp.issparse(vectors):
        sq = np.asarray(vectors.multiply(vectors).sum(axis=1), dtype=np.float64).ravel()
    else:
        sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    return np.sqrt(sq).astype(np.float32)


def normalize_rows(vectors: Vectors, norms: np.ndarray) -> Vectors:
    """Scale rows to unit length for cosine; all-zero rows stay zero (they score 0 against everything)."""
    scale = np.zeros_like(norms, dtype=np.float32)
    nz = norms > 0
    scale[nz] = 1.0 / norms[nz]
    if sp.issparse(vectors):
        out = vectors.copy()
        out.data *= np.repeat(scale, np.diff(out.indptr))
        return out
    return vectors * scale[:, None]
