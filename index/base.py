"""The interface every index backend implements, with the parts they share: input checks, payloads, locking, files.

Backends only implement the ``_``-prefixed hooks and get validated, already-normalised input under the right
lock, so the rules (ids, non-negative finite vectors, replace-on-add, unknown ids rejected, cosine handling)
hold identically for all of them.

Thread safety: each index holds a readers-writer lock (:class:`index.rwlock.RWLock`). ``search``,
``reconstruct`` and payload reads share it; ``add``, ``remove``, ``save`` and ``tune`` are exclusive.
"""

from __future__ import annotations

import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from index import store
from index.errors import CorruptIndexError, IndexMismatchError, InvalidInputError, UnknownIdError
from index.rwlock import RWLock
from index.thumbnails import read_thumbnails, write_thumbnails
from index.validation import (
    Vectors,
    check_dim,
    check_ids,
    check_k,
    check_metric,
    check_payloads,
    check_thumbnails,
    check_vectors,
    n_rows,
    normalize_rows,
    row_norms,
)


class VectorIndex(ABC):
    """Exact or approximate top-k search over non-negative vectors with caller-chosen int64 ids.

    Scores are inner products (``metric="ip"``) or cosine similarities (``metric="cosine"``; vectors and
    queries are scaled to unit length, all-zero vectors score 0). ``search`` returns ``(scores, ids)`` of shape
    ``(n_queries, k)``, best first; slots beyond the number of stored vectors hold id -1 and score -inf.
    """

    backend: ClassVar[str]

    def __init__(self, dim: int, metric: str = "ip") -> None:
        self._dim = check_dim(dim)
        self._metric = check_metric(metric)
        self._payloads: dict[int, Any] = {}
        self._thumbnails: dict[int, bytes] = {}  # PNG per item, beside the payload (index/thumbnails.py)
        self._lock = RWLock()
        self.metadata: dict[str, Any] = {}  # free-form JSON saved in the manifest (e.g. which model built it)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    def __len__(self) -> int:
        return self._count()

    def __contains__(self, item: object) -> bool:
        try:
            ids = check_ids(item)
        except ValueError:
            return False
        with self._lock.read():
            return bool(self._contains(ids)[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self._dim}, metric={self._metric!r}, count={len(self)})"

    def add(
        self,
        ids: Any,
        vectors: Any,
        payloads: Sequence[Any] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Insert vectors under ``ids``; an id already present is replaced (vector, payload and thumbnail)."""
        checked_write = self._check_write(ids, vectors, payloads, thumbnails)
        if checked_write is None:
            return
        ids, vecs, norms, checked, thumbs = checked_write
        with self._lock.write():
            self._add(ids, vecs, norms)
            for i, key in enumerate(ids.tolist()):
                for kept, given in ((self._payloads, checked), (self._thumbnails, thumbs)):
                    if given is not None and given[i] is not None:
                        kept[key] = given[i]
                    else:
                        kept.pop(key, None)

    def _check_write(
        self, ids: Any, vectors: Any, payloads: Sequence[Any] | None, thumbnails: Sequence[bytes | None] | None
    ) -> tuple[np.ndarray, Any, np.ndarray, list[Any] | None, list[bytes | None] | None] | None:
        """Validate an add before any backend sees it (Milvus validates differently): (ids, vectors normalised for
        cosine, their original norms, payloads, thumbnails), or None for an empty write."""
        ids = check_ids(ids)
        vecs = check_vectors(vectors, self._dim)
        if n_rows(vecs) != ids.size:
            raise InvalidInputError(f"got {ids.size} ids for {n_rows(vecs)} vectors")
        checked = check_payloads(payloads, ids.size)
        thumbs = check_thumbnails(thumbnails, ids.size)
        if ids.size == 0:
            return None
        norms = row_norms(vecs)
        if self._metric == "cosine":
            vecs = normalize_rows(vecs, norms)
        return ids, vecs, norms, checked, thumbs

    def remove(self, ids: Any) -> int:
        """Delete ``ids``; if any is unknown nothing is removed and :class:`UnknownIdError` names them."""
        ids = check_ids(ids)
        if ids.size == 0:
            return 0
        with self._lock.write():
            check_known(ids, self._contains(ids))
            self._remove(ids)
            for key in ids.tolist():
                self._payloads.pop(key, None)
                self._thumbnails.pop(key, None)
        return int(ids.size)

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` scores (float32) and ids (int64) per query row, best first."""
        k = check_k(k)
        q = check_vectors(queries, self._dim, what="queries", copy=False)
        if self._metric == "cosine":
            q = normalize_rows(q, row_norms(q))
        nq = n_rows(q)
        with self._lock.read():
            if nq == 0 or self._count() == 0:
                return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
            scores, ids = self._search(q, k)
        return _finish(scores, ids)

    def prepare(self) -> None:
        """Build now what the first search would build lazily (caches, compiled code); a no-op by default."""
        return None

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean per id: whether it is stored (vectorised ``in``)."""
        ids = check_ids(ids)
        with self._lock.read():
            return self._contains(ids)

    def ids(self) -> np.ndarray:
        """All stored ids, sorted."""
        with self._lock.read():
            return self._ids()

    def reconstruct(self, ids: Any) -> sp.csr_matrix:
        """The stored vectors of ``ids`` as given to ``add`` (up to float32 rounding), in CSR form."""
        ids = check_ids(ids)
        with self._lock.read():
            check_known(ids, self._contains(ids))
            return self._reconstruct(ids)

    def payload(self, id_: int) -> Any:
        """The JSON payload stored with ``id_`` (None if none); unknown ids raise :class:`UnknownIdError`."""
        return self.payloads([id_])[0]

    def payloads(self, ids: Any) -> list[Any]:
        """Payloads of ``ids`` in order; -1 (an empty result slot) gives None, unknown ids raise."""
        return self._lookup(ids, self._payloads)

    def thumbnails(self, ids: Any) -> list[bytes | None]:
        """Thumbnail PNGs of ``ids`` in order (None where an item has none); same id rules as :meth:`payloads`."""
        return self._lookup(ids, self._thumbnails)

    def _lookup(self, ids: Any, table: dict[int, Any]) -> list[Any]:
        keys = np.asarray(ids, dtype=np.int64).ravel()
        with self._lock.read():
            asked = keys[keys != -1]
            check_known(asked, self._contains(asked) if asked.size else np.ones(0, bool))
            return [table.get(int(k)) for k in keys.tolist()]

    @property
    def thumbnail_count(self) -> int:
        """How many items carry a thumbnail."""
        return len(self._thumbnails)

    def save(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the index atomically (see :mod:`index.store`); returns the manifest."""
        with self._lock.write():
            self._before_save()
            header = {
                "backend": self.backend,
                "dim": self._dim,
                "metric": self._metric,
                "count": self._count(),
                "options": self._options(),
                "metadata": self.metadata,
                "software": _software_versions(),
            }
            writers = dict(self._writers())
            writers["payloads"] = (".jsonl", self._write_payloads)
            if self._thumbnails:  # optional role: indexes without images (or built with --thumbnails 0) omit it
                thumbs = dict(self._thumbnails)
                writers["thumbnails"] = (".npz", lambda path: write_thumbnails(path, thumbs))
            return store.save_dir(directory, header, writers)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, manifest: dict[str, Any] | None = None, verify: bool = True
    ) -> VectorIndex:
        manifest = manifest if manifest is not None else store.read_manifest(directory)
        if manifest["backend"] != cls.backend:
            raise IndexMismatchError(f"{directory} holds a {manifest['backend']!r} index, not {cls.backend!r}")
        try:
            dim = check_dim(manifest["dim"])
            metric = check_metric(manifest["metric"])
        except ValueError as err:
            raise CorruptIndexError(f"{directory}/{store.MANIFEST}: {err}") from None
        roles = (*cls._file_roles, "payloads")
        paths = store.verified_paths(directory, manifest, roles, verify=verify)
        options = manifest.get("options") or {}
        given = inspect.signature(cls).parameters  # the saved options that are constructor arguments
        try:
            index = cls(dim, metric, **{key: value for key, value in options.items() if key in given})
        except (ValueError, TypeError) as err:
            raise CorruptIndexError(f"{Path(directory)}: invalid options in the manifest: {err}") from None
        index._read_files(options, paths)
        count = index._count()
        if count != manifest["count"]:
            raise CorruptIndexError(
                f"{directory}: the files hold {count} vectors, the manifest says {manifest['count']}"
            )
        index._payloads = _read_payloads(paths["payloads"])
        stray = [k for k in index._payloads if not index._contains(np.array([k], np.int64))[0]]
        if stray:
            raise CorruptIndexError(f"{directory}: payloads for ids not in the index: {stray[:5]}")
        if "thumbnails" in manifest["files"]:
            thumb_path = store.verified_paths(directory, manifest, ("thumbnails",), verify=verify)["thumbnails"]
            index._thumbnails = read_thumbnails(thumb_path)
            known = index._contains(np.fromiter(index._thumbnails, np.int64, len(index._thumbnails)))
            if not known.all():
                raise CorruptIndexError(f"{directory}: thumbnails for ids not in the index")
        index.metadata = dict(manifest.get("metadata") or {})
        return index

    def _write_payloads(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for key in sorted(self._payloads):
                f.write(json.dumps({"id": key, "payload": self._payloads[key]}, allow_nan=False))
                f.write("\n")

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _contains(self, ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _ids(self) -> np.ndarray: ...

    # The hooks behind add, remove, search, reconstruct, save and load, for the backends that hold their data in
    # this process (csr, faiss); one that overrides those methods (milvus: the collection is the store) has none.
    _file_roles: ClassVar[tuple[str, ...]]  # the data files of a saved index, besides the payloads

    def _add(self, ids: np.ndarray, vectors: Vectors, norms: np.ndarray) -> None:
        """Insert checked (and for cosine already unit-length) vectors; replace ids that exist."""
        raise NotImplementedError

    def _remove(self, ids: np.ndarray) -> None:
        """Delete ids, all known to be present."""
        raise NotImplementedError

    def _search(self, queries: Vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each (n_queries, k); unfilled slots may hold any id with score -inf."""
        raise NotImplementedError

    def _reconstruct(self, ids: np.ndarray) -> sp.csr_matrix:
        raise NotImplementedError

    def _before_save(self) -> None:
        """Compact tombstones before writing, so files never carry dead rows."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        raise NotImplementedError

    def _writers(self) -> dict[str, tuple[str, store.Writer]]:
        raise NotImplementedError

    def _read_files(self, options: dict[str, Any], paths: dict[str, Path]) -> None:
        """Fill this index, just built with the manifest's options, from its checked files."""
        raise NotImplementedError


def check_known(ids: np.ndarray, present: np.ndarray) -> None:
    """Refuse a request naming ids that are not stored (``present``: one flag per id), showing the first ten."""
    if present.all():
        return
    missing = ids[~present]
    shown = ", ".join(str(i) for i in missing[:10].tolist())
    more = f" and {missing.size - 10} more" if missing.size > 10 else ""
    raise UnknownIdError(f"unknown ids: {shown}{more} ({missing.size} of {ids.size} not in the index)")


# Up to this k, results are ordered by a compiled insertion sort (~1 us instead of ~40 us for a lexsort).
_COMPILED_FINISH_K = 64


def _finish(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mark empty slots (-1, -inf) and order each row by score, ties by ascending id, for reproducible output."""
    if scores.ndim == 2 and scores.shape == ids.shape and scores.shape[1] <= _COMPILED_FINISH_K:
        from index.compiled import finish_topk  # numba: imported when a search first needs it

        return finish_topk(np.asarray(scores, np.float32), np.asarray(ids, np.int64))
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64).copy()
    empty = ~np.isfinite(scores) | (ids < 0)
    scores = np.where(empty, np.float32(-np.inf), scores)
    ids[empty] = -1
    tie_key = np.where(empty, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_key, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _read_payloads(path: Path) -> dict[int, Any]:
    out: dict[int, Any] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                out[int(record["id"])] = record["payload"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise CorruptIndexError(f"{path.name} line {lineno} is not a payload record: {err}") from None
    return out


def _software_versions() -> dict[str, str]:
    import faiss  # a dependency (faiss-cpu, or faiss-gpu-cu12 with the gpu extra), as numpy and scipy are
    import scipy

    return {"numpy": np.__version__, "scipy": scipy.__version__, "faiss": faiss.__version__}
