"""Milvus backend: the index lives in a Milvus collection, so any number of processes (and machines) share it.

One collection per index, created on the first write (so the model metadata set after construction goes in):

    id       INT64 primary key          the caller's id (ids are validated to [0, MAX_ID] before they get here)
    vec      SPARSE_FLOAT_VECTOR, IP    unit-length for metric "cosine" (then IP == cosine), as given for "ip"
    norm     FLOAT                      L2 norm as added, so ``reconstruct`` returns what the caller gave
    payload  JSON                       ``{"v": payload}``: milvus-lite 2.5.1 segfaults on a bare JSON null
    thumb    JSON                       ``{"png": base64 or null}`` (milvus-lite 2.5.1 cannot return an empty
                                        query result from a collection with an ARRAY field; VARCHAR caps at 64 KiB)
    thumb_bytes INT64                   the PNG's size, 0 for none (counted by ``thumbnail_count``)

The collection description holds ``{"format", "dim", "metric", "index", "metadata"}``; opening an existing
collection with another dimension or metric raises :class:`IndexMismatchError`, as loading an index directory does
(milvus-lite cannot alter collection properties, so the description is written once, at creation).

``uri`` is what ``pymilvus.MilvusClient`` takes: a local ``*.db`` file (embedded Milvus Lite, a subprocess the
client starts; one process per file), ``http://host:19530`` (``lpjepa milvus serve``, Milvus standalone or a
cluster; ``token`` for ``user:password`` or an API key). Reads use Strong consistency, so a search sees every write
acknowledged before it, from this process or any other. Writes are upserts in batches of ``batch_rows``; a call
returns only after Milvus acknowledged every batch, and a failure raises (earlier batches of the same call may
already be stored; upserts are idempotent, so retrying the call is safe).

Index kinds: ``exact`` (default) is ``SPARSE_INVERTED_INDEX`` with no pruning (``drop_ratio_build`` and
``drop_ratio_search`` 0); ``wand`` is ``SPARSE_WAND`` (dynamic pruning; exact in principle, faster on long posting
lists).

Milvus does not validate like this package does (NaN, negative values, out-of-range dimensions, JSON nulls are
accepted, refused or crash the server depending on the version), so every input goes through
:mod:`index.validation` first, exactly as for the other backends. Failures to reach Milvus raise
:class:`BackendUnavailableError` (a ``ConnectionError``) within about twice ``timeout_s``, never a bare pymilvus error.

Scores of items that share no dimension with the query are 0 and Milvus does not return them; when a result row is
short of ``min(k, len(index))`` it is padded with such items, smallest ids first (the tie rule of the other
backends). ``k`` is capped by Milvus at 16384.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import math
import os
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from index.base import VectorIndex, _finish, check_known
from index.errors import BackendUnavailableError, IndexMismatchError, InvalidInputError
from index.validation import check_ids, check_k, check_vectors, n_rows, normalize_rows, row_norms

FORMAT = "lpjepa-milvus-index/1"
DEFAULT_COLLECTION = "lpjepa"
INDEX_KINDS = ("exact", "wand")
MAX_TOPK = 16384  # Milvus's limit on limit (and on offset + limit of a query)
_ID_PAGE = MAX_TOPK  # ids per page when listing them all
_ID_CHUNK = 4096  # ids per `id in [...]` query
_QUERY_CHUNK = 256  # query vectors per search call


def _pymilvus():
    # pymilvus logs every failed attempt at ERROR with the whole gRPC status; failures reach the caller as
    # BackendUnavailableError (logged once by whoever handles it), so its own log stays for critical problems.
    try:
        with warnings.catch_warnings():  # milvus-lite 2.5.1 imports the deprecated pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            import pymilvus

            with contextlib.suppress(ImportError):
                import milvus_lite  # noqa: F401 - pymilvus imports it for *.db uris; warn-free here
        for name in ("pymilvus", "pymilvus.milvus_client"):  # pymilvus configures both at import
            logging.getLogger(name).setLevel(logging.CRITICAL)
    except ImportError as err:  # pragma: no cover - a dependency; the message names the fix
        raise BackendUnavailableError(f"the milvus backend needs pymilvus 2.5 and milvus-lite 2.5.1: {err}") from None
    return pymilvus


def _is_local_file(uri: str) -> bool:
    return "://" not in uri


def _describe_uri(uri: str) -> str:
    return f"Milvus Lite file {uri}" if _is_local_file(uri) else f"Milvus at {uri}"


class MilvusIndex(VectorIndex):
    """A Milvus collection behind the common interface (see module docstring)."""

    backend = "milvus"
    owns_durability: ClassVar[bool] = True  # serve/store.py opens no local database: Milvus keeps the writes

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        *,
        uri: str,
        collection: str = DEFAULT_COLLECTION,
        token: str | None = None,
        index: str = "exact",
        timeout_s: float = 10.0,
        batch_rows: int = 2000,
    ) -> None:
        super().__init__(dim, metric)
        if not isinstance(uri, str | os.PathLike) or not str(uri):
            raise InvalidInputError("the milvus backend needs a uri: a local .db file or http://host:port")
        if index not in INDEX_KINDS:
            raise InvalidInputError(f"unknown milvus index {index!r}; choose one of {', '.join(INDEX_KINDS)}")
        if not isinstance(collection, str) or not collection.replace("_", "a").isalnum() or collection[0].isdigit():
            raise InvalidInputError(
                f"collection name must be letters, digits and underscores, not starting with a digit: {collection!r}"
            )
        if not timeout_s > 0:
            raise InvalidInputError(f"timeout_s must be positive, got {timeout_s!r}")
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise InvalidInputError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        self.uri = str(uri)
        if _is_local_file(self.uri):
            if not self.uri.endswith(".db"):
                raise InvalidInputError(f"a local Milvus Lite database is a file ending in .db, got {self.uri!r}")
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self.collection = collection
        self.index_kind = index
        self.timeout_s = float(timeout_s)
        self._rpc_timeout = max(1, math.ceil(self.timeout_s))
        self.batch_rows = batch_rows
        self._token = token
        self._closed = False
        if _is_local_file(self.uri):
            _LOCAL_USERS[_local_key(self.uri)] += 1
        self._client = self._connect()
        self._broken = False
        self._exists = False
        self._refresh()

    def _connect(self) -> Any:
        hint = " (a Milvus Lite file is opened by one process at a time: share it with `lpjepa milvus serve`)"
        return _client(self.uri, self._token, self.timeout_s, hint if _is_local_file(self.uri) else "")

    def _call(self, method: str, *args: Any, what: str | None = None, **kwargs: Any) -> Any:
        """Run one client call; a failure of Milvus becomes BackendUnavailableError naming ``what`` (the method).

        The timeout is passed as an int because pymilvus's retry loop honours only an int ``timeout`` (a float one
        falls back to 75 retries, minutes against a dead server); each attempt has that deadline too, so a call
        gives up after at most about twice ``timeout_s``.
        """
        if self._broken:
            self._reconnect()
        try:
            return getattr(self._client, method)(*args, timeout=self._rpc_timeout, **kwargs)
        except Exception as err:  # noqa: BLE001 - see _client
            self._broken = True
            raise BackendUnavailableError(
                f"{_describe_uri(self.uri)}: {what or method} failed: {_short(err)}"
            ) from None

    def _reconnect(self) -> None:
        """A fresh client after a failure: gRPC's own reconnect backoff grows to minutes while a server is down."""
        with contextlib.suppress(Exception):  # the broken channel; the new client gets a fresh alias
            self._client.close()
        if _is_local_file(self.uri):  # a dead embedded engine stays registered in pymilvus: stop it, start anew
            _restart_local(self.uri)
        self._client = self._connect()
        self._broken = False

    def ping(self) -> None:
        """Raise BackendUnavailableError unless Milvus answers (the server's readiness check)."""
        self._call("has_collection", self.collection, what="ping")

    @property
    def available(self) -> bool:
        """False after a call failed and until one succeeds again (no call is made here)."""
        return not self._broken

    def close(self) -> None:
        """Close the connection; the last index of a process on a Milvus Lite file also stops its engine process
        (pymilvus starts one per file and never stops it), so the file can be opened by another process."""
        with contextlib.suppress(Exception):  # closing a dead connection must not fail a shutdown
            self._client.close()
        if _is_local_file(self.uri) and not self._closed:
            self._closed = True
            _release_local(self.uri)

    def _refresh(self) -> None:
        """Adopt the collection if it exists, after checking it is an index of this dimension and metric."""
        if not self._call("has_collection", self.collection):
            self._exists = False
            return
        desc = self._call("describe_collection", self.collection)
        head = _parse_head(desc, self.uri, self.collection)
        _check_head(head, self.collection, self._dim, self._metric)
        self.index_kind = str(head.get("index") or self.index_kind)
        self.metadata = dict(head.get("metadata") or {})
        self._exists = True
        # After a Milvus restart a collection is released; searching it needs it loaded.
        self._call("load_collection", self.collection)

    def _ensure(self) -> None:
        if self._exists:
            return
        pymilvus = _pymilvus()
        DataType = pymilvus.DataType  # noqa: N806 - pymilvus's name
        head = {
            "format": FORMAT,
            "dim": self._dim,
            "metric": self._metric,
            "index": self.index_kind,
            "metadata": self.metadata,
        }
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps(head, sort_keys=True)
        )
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("norm", DataType.FLOAT)
        schema.add_field("payload", DataType.JSON)
        schema.add_field("thumb", DataType.JSON)
        schema.add_field("thumb_bytes", DataType.INT64)
        params = self._client.prepare_index_params()
        kind = "SPARSE_WAND" if self.index_kind == "wand" else "SPARSE_INVERTED_INDEX"
        params.add_index(field_name="vec", index_type=kind, metric_type="IP", params={"drop_ratio_build": 0})
        try:
            self._client.create_collection(
                self.collection,
                schema=schema,
                index_params=params,
                consistency_level="Strong",
                timeout=self._rpc_timeout,
            )
        except Exception as err:  # noqa: BLE001 - another process may have created it first: adopt that one
            if not self._call("has_collection", self.collection):
                raise BackendUnavailableError(
                    f"{_describe_uri(self.uri)}: creating collection {self.collection!r} failed: {_short(err)}"
                ) from None
        self._refresh()

    def drop(self) -> None:
        """Delete the collection and everything in it (``lpjepa index build`` replaces an index this way)."""
        if self._call("has_collection", self.collection):
            self._call("drop_collection", self.collection)
        self._exists = False

    def add(
        self,
        ids: Any,
        vectors: Any,
        payloads: Sequence[Any] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Upsert vectors (and payloads, thumbnails) under ``ids``; returns once Milvus acknowledged them all."""
        checked_write = self._check_write(ids, vectors, payloads, thumbnails)
        if checked_write is None:
            return
        ids, vecs, norms, checked, thumbs = checked_write
        csr = sp.csr_matrix(vecs, dtype=np.float32)
        self._ensure()
        for lo in range(0, ids.size, self.batch_rows):
            hi = min(ids.size, lo + self.batch_rows)
            rows = [
                {
                    "id": int(ids[r]),
                    "vec": _row_dict(csr, r),
                    "norm": float(norms[r]),
                    "payload": {"v": None if checked is None else checked[r]},
                    "thumb": _thumb_json(None if thumbs is None else thumbs[r]),
                    "thumb_bytes": 0 if thumbs is None or thumbs[r] is None else len(thumbs[r]),
                }
                for r in range(lo, hi)
            ]
            self._call("upsert", self.collection, rows)

    def remove(self, ids: Any) -> int:
        """Delete ``ids``; if any is unknown nothing is removed and :class:`UnknownIdError` names them.

        The check and the delete are two calls: another process may remove an id in between (then the delete is a
        no-op for it), which is the same outcome as the two removals running one after the other.
        """
        ids = check_ids(ids)
        if ids.size == 0:
            return 0
        self._present(ids, [])
        for chunk in _chunks(ids, _ID_CHUNK):
            self._call("delete", self.collection, ids=[int(i) for i in chunk])
        return int(ids.size)

    def _checked_queries(self, queries: Any, k: int) -> tuple[int, Any]:
        """(k, queries) after the checks every search runs, queries unit-length for cosine."""
        k = check_k(k)
        if k > MAX_TOPK:
            raise InvalidInputError(f"the milvus backend returns at most {MAX_TOPK} results per query, got k={k}")
        q = check_vectors(queries, self._dim, what="queries")
        return k, normalize_rows(q, row_norms(q)) if self._metric == "cosine" else q

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        k, q = self._checked_queries(queries, k)
        nq = n_rows(q)
        scores = np.full((nq, k), -np.inf, np.float32)
        found = np.full((nq, k), -1, np.int64)
        if not self._live() or nq == 0:
            return scores, found
        csr = sp.csr_matrix(q, dtype=np.float32)
        count: int | None = None
        for lo in range(0, nq, _QUERY_CHUNK):
            hi = min(nq, lo + _QUERY_CHUNK)
            result = self._search_call([_row_dict(csr, r) for r in range(lo, hi)], k)
            for r, hits in zip(range(lo, hi), result, strict=True):
                n = min(k, len(hits))
                found[r, :n] = [int(h["id"]) for h in hits[:n]]
                scores[r, :n] = [float(h["distance"]) for h in hits[:n]]
                if n < k:
                    count = self._count() if count is None else count
                    pad = self._zero_hits(found[r, :n], k, count)
                    found[r, n : n + pad.size] = pad
                    scores[r, n : n + pad.size] = 0.0
        return _finish(scores, found)

    def search_items(
        self, queries: Any, k: int = 10, *, thumbnails: bool = False
    ) -> list[tuple[int, float, Any, bytes | None]]:
        """(id, score, payload, thumbnail or None) of the first query row's top ``k``, best first, in one search
        call that returns the payloads with the hits (the server's path; ``search`` + ``payloads`` is two)."""
        k, q = self._checked_queries(queries, k)
        if n_rows(q) == 0 or not self._live():
            return []
        fields = ["payload", "thumb"] if thumbnails else ["payload"]
        result = self._search_call([_row_dict(sp.csr_matrix(q, dtype=np.float32), 0)], k, output_fields=fields)
        hits = [
            (int(h["id"]), float(h["distance"]), h["entity"].get("payload"), h["entity"].get("thumb"))
            for h in result[0][:k]
        ]
        if len(hits) < k:
            pad = self._zero_hits(np.array([h[0] for h in hits], np.int64), k, self._count())
            rows = self._query_ids(pad, fields)
            hits += [
                (int(i), 0.0, rows[int(i)].get("payload"), rows[int(i)].get("thumb")) for i in pad if int(i) in rows
            ]
        # the order of _finish: score, then ascending id among ties
        hits.sort(key=lambda h: (-np.float32(h[1]), h[0]))
        return [
            (i, float(np.float32(sc)), (p or {}).get("v"), _thumb_bytes(t) if thumbnails else None)
            for i, sc, p, t in hits
        ]

    def _search_call(self, data: list[dict[int, float]], k: int, **output: Any) -> list[list[dict[str, Any]]]:
        """One search RPC, exhaustive (no pruning at search time): per query row its hits, best first."""
        params = {"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}
        return self._call(
            "search", self.collection, data=data, anns_field="vec", limit=k, search_params=params, **output
        )

    def _zero_hits(self, exclude: np.ndarray, k: int, count: int) -> np.ndarray:
        """The zero-score hits (items sharing no dimension with the query): smallest ids not in `exclude`."""
        n = min(k, count) - exclude.size
        if n <= 0:
            return np.zeros(0, np.int64)
        skip = ", ".join(str(int(i)) for i in exclude)
        expr = f"id not in [{skip}]" if skip else "id >= 0"
        rows = self._call("query", self.collection, filter=expr, output_fields=["id"], limit=n)
        return np.sort(np.array([int(r["id"]) for r in rows], np.int64))[:n]

    def _live(self) -> bool:
        """Whether the collection exists, looking again if not: another process may have created it since."""
        if not self._exists:
            self._refresh()
        return self._exists

    def _count(self) -> int:
        if not self._live():
            return 0
        rows = self._call("query", self.collection, filter="", output_fields=["count(*)"], what="count")
        return int(rows[0]["count(*)"])

    def _query_ids(self, ids: np.ndarray, fields: list[str]) -> dict[int, dict[str, Any]]:
        """Rows of the ids that exist, keyed by id (one query per chunk of ids)."""
        out: dict[int, dict[str, Any]] = {}
        if not self._live():
            return out
        for chunk in _chunks(ids, _ID_CHUNK):
            expr = f"id in [{', '.join(str(int(i)) for i in chunk)}]"
            rows = self._call("query", self.collection, filter=expr, output_fields=["id", *fields], limit=chunk.size)
            out.update({int(r["id"]): r for r in rows})
        return out

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        known = self._query_ids(ids, [])
        return np.array([int(i) in known for i in ids], dtype=bool)

    def contains(self, ids: Any) -> np.ndarray:
        return self._contains(check_ids(ids))

    def _ids(self) -> np.ndarray:
        return np.fromiter(self._iter_ids(), np.int64)

    def ids(self) -> np.ndarray:
        return np.sort(self._ids())

    def _iter_ids(self) -> Iterator[int]:
        """Every id, ascending, in pages of _ID_PAGE (Milvus returns query results in primary-key order)."""
        # A short page is the last one: no query for the empty page after it.
        if not self._live():
            return
        last = -1
        while True:
            rows = self._call("query", self.collection, filter=f"id > {last}", output_fields=["id"], limit=_ID_PAGE)
            if not rows:
                return
            page = sorted(int(r["id"]) for r in rows)
            yield from page
            if len(page) < _ID_PAGE:
                return
            last = page[-1]

    def reconstruct(self, ids: Any) -> sp.csr_matrix:
        ids = check_ids(ids)
        rows = self._present(ids, ["vec", "norm"])
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        for i in ids.tolist():
            cols, values = self._stored_vector(rows[i])
            indices.extend(cols)
            data.extend(values)
            indptr.append(len(indices))
        return sp.csr_matrix(
            (np.asarray(data, np.float32), np.asarray(indices, np.int32), np.asarray(indptr, np.int64)),
            shape=(ids.size, self._dim),
        )

    def _present(self, ids: np.ndarray, fields: list[str]) -> dict[int, dict[str, Any]]:
        rows = self._query_ids(ids, fields)
        check_known(ids, np.array([int(i) in rows for i in ids], dtype=bool))
        return rows

    def payloads(self, ids: Any) -> list[Any]:
        return self._field_of(ids, "payload", lambda p: (p or {}).get("v"))

    def thumbnails(self, ids: Any) -> list[bytes | None]:
        return self._field_of(ids, "thumb", _thumb_bytes)

    def _field_of(self, ids: Any, name: str, convert: Any) -> list[Any]:
        keys = np.asarray(ids, dtype=np.int64).ravel()
        asked = np.unique(keys[keys != -1])
        rows = self._present(asked, [name]) if asked.size else {}
        return [None if k == -1 else convert(rows[k][name]) for k in keys.tolist()]

    def items(self, ids: Any) -> dict[int, dict[str, Any]]:
        """{id: {"payload", "thumbnail", "vector" (CSR row)}} of the ids that exist, in one query per chunk."""
        keys = check_ids(ids)
        rows = self._query_ids(keys, ["vec", "norm", "payload", "thumb"])
        out: dict[int, dict[str, Any]] = {}
        for i, row in rows.items():
            cols, values = self._stored_vector(row)
            out[i] = {
                "payload": (row["payload"] or {}).get("v"),
                "thumbnail": _thumb_bytes(row["thumb"]),
                "indices": np.asarray(cols, np.int64),
                "values": np.asarray(values, np.float32),
            }
        return out

    def _stored_vector(self, row: dict[str, Any]) -> tuple[list[int], list[float]]:
        """(columns ascending, values) of a stored row, scaled back by its norm for cosine."""
        vec = row["vec"] or {}
        cols = sorted(int(c) for c in vec)
        scale = float(row["norm"]) if self._metric == "cosine" else 1.0
        return cols, [float(vec[c]) * scale for c in cols]

    @property
    def thumbnail_count(self) -> int:
        if not self._exists:
            return 0
        rows = self._call("query", self.collection, filter="thumb_bytes > 0", output_fields=["count(*)"], what="count")
        return int(rows[0]["count(*)"])

    def prepare(self) -> None:
        """Make sure the collection exists and is loaded, so the first request does not pay for it."""
        self._ensure()

    def save(self, directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Flush the collection (creating it when nothing was added); Milvus owns the files, ``directory`` is unused.

        Returns a manifest-like summary (backend, dim, metric, count, collection, uri) for the CLI.
        """
        self._ensure()
        self._call("flush", self.collection)
        return {
            "backend": self.backend,
            "dim": self._dim,
            "metric": self._metric,
            "count": self._count(),
            "collection": self.collection,
            "uri": self.uri,
            "index": self.index_kind,
            "files": {},
        }

    @classmethod
    def load(cls, directory: Any, **_: Any) -> VectorIndex:  # pragma: no cover - a collection is opened, not loaded
        raise IndexMismatchError("a milvus index is opened with its uri and collection (--milvus-uri), not a directory")


def _describe_collection(
    uri: str, collection: str, token: str | None, timeout_s: float
) -> tuple[Any, dict[str, Any] | None]:
    """(client, the collection's lpjepa header or None when there is no such collection); foreign ones raise."""
    rpc_timeout = max(1, math.ceil(timeout_s))  # an int: see MilvusIndex._call
    client = _client(str(uri), token, timeout_s)
    try:
        if not client.has_collection(collection, timeout=rpc_timeout):
            return client, None
        desc = client.describe_collection(collection, timeout=rpc_timeout)
    except Exception as err:  # noqa: BLE001
        raise BackendUnavailableError(f"{_describe_uri(str(uri))}: describe failed: {_short(err)}") from None
    return client, _parse_head(desc, str(uri), collection)


def _parse_head(desc: dict[str, Any], uri: str, collection: str) -> dict[str, Any]:
    """The lpjepa header in a collection's description; anyone else's collection raises."""
    try:
        head = json.loads(desc.get("description") or "")
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise ValueError
        int(head["dim"])
    except (ValueError, KeyError, TypeError):
        raise IndexMismatchError(
            f"collection {collection!r} in {_describe_uri(uri)} was not created by lpjepa; choose another --collection"
        ) from None
    return head


def _check_head(head: dict[str, Any], collection: str, dim: int | None, metric: str | None) -> None:
    """Refuse a collection of another dimension or metric than the caller's (None: any)."""
    if dim is not None and head.get("dim") != dim:
        raise IndexMismatchError(
            f"collection {collection!r} has dimension {head.get('dim')} but the model produces {dim};"
            " was it built with another model?"
        )
    if metric is not None and head.get("metric") != metric:
        raise IndexMismatchError(f"collection {collection!r} uses metric {head.get('metric')!r}, not {metric!r}")


def open_milvus_index(
    uri: str,
    collection: str = DEFAULT_COLLECTION,
    *,
    token: str | None = None,
    expected_dim: int | None = None,
    expected_metric: str | None = None,
    timeout_s: float = 10.0,
) -> MilvusIndex:
    """Open an existing collection with the dimension and metric it was created with (lpjepa search)."""
    client, head = _describe_collection(uri, collection, token, timeout_s)
    with contextlib.suppress(Exception):
        client.close()
    if head is None:
        raise IndexMismatchError(
            f"{_describe_uri(str(uri))} has no collection {collection!r}; build one with "
            "`lpjepa index build --backend milvus`"
        )
    _check_head(head, collection, expected_dim, expected_metric)
    dim, metric = int(head["dim"]), str(head["metric"])
    kind = str(head.get("index", "exact"))
    return MilvusIndex(dim, metric, uri=str(uri), collection=collection, token=token, index=kind, timeout_s=timeout_s)


def drop_collection(
    uri: str, collection: str = DEFAULT_COLLECTION, *, token: str | None = None, timeout_s: float = 10.0, **_: Any
) -> bool:
    """Drop an lpjepa collection (True) or do nothing when there is none (False); anyone else's is refused."""
    client, head = _describe_collection(uri, collection, token, timeout_s)
    try:
        if head is None:
            return False
        client.drop_collection(collection, timeout=max(1, math.ceil(timeout_s)))
        return True
    except Exception as err:  # noqa: BLE001
        raise BackendUnavailableError(f"{_describe_uri(str(uri))}: drop failed: {_short(err)}") from None
    finally:
        with contextlib.suppress(Exception):
            client.close()


_LOCAL_USERS: collections.Counter[str] = collections.Counter()  # open indexes per Milvus Lite file, this process
_LOCAL_LOCK = threading.Lock()


def _local_key(uri: str) -> str:
    return str(Path(uri).absolute().resolve())


def _release_local(uri: str) -> None:
    key = _local_key(uri)
    with _LOCAL_LOCK:
        _LOCAL_USERS[key] -= 1
        if _LOCAL_USERS[key] > 0:
            return
        del _LOCAL_USERS[key]
    _restart_local(uri)


def _restart_local(uri: str) -> None:
    """Stop pymilvus's embedded engine of ``uri`` (if any); the next connection starts a new one."""
    with contextlib.suppress(Exception):
        from milvus_lite.server_manager import server_manager_instance

        if _local_key(uri) in server_manager_instance._servers:
            server_manager_instance.release_server(uri)


def _client(uri: str, token: str | None, timeout_s: float, hint: str = "") -> Any:
    try:
        return _pymilvus().MilvusClient(uri=uri, token=token or "", timeout=timeout_s, alias=_alias())
    except Exception as err:  # noqa: BLE001 - pymilvus raises MilvusException, grpc errors, RuntimeError
        raise BackendUnavailableError(f"cannot connect to {_describe_uri(uri)}: {_short(err)}{hint}") from None


def _alias() -> str:
    """A connection of its own: pymilvus shares one connection per uri + token in a process by default, and
    ``close()`` (or a reconnect) of one client would then cut off every other index on that uri."""
    return f"lpjepa-{uuid.uuid4().hex}"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + " ...") if len(text) > 300 else (text or type(err).__name__)


def _chunks(arr: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, arr.size, size):
        yield arr[lo : lo + size]


def _row_dict(csr: sp.csr_matrix, r: int) -> dict[int, float]:
    lo, hi = csr.indptr[r], csr.indptr[r + 1]
    return dict(zip(csr.indices[lo:hi].tolist(), csr.data[lo:hi].tolist(), strict=True))


def _thumb_json(png: bytes | None) -> dict[str, str | None]:
    return {"png": None if not png else base64.b64encode(png).decode("ascii")}


def _thumb_bytes(field: Any) -> bytes | None:
    text = (field or {}).get("png")
    return None if not text else base64.b64decode(text)
