"""The served index: searches, durable writes and snapshots, behind one lock.

Single node (csr/faiss backends): every write is committed to the database (serve/durable_log.py) before the reply,
then applied to the in-memory index. On start-up the last snapshot (the index directory as ``index.save`` wrote it)
is loaded and the rows written after it are applied over it. Its manifest records the sequence number it covers
(``metadata["serve_seq"]``, in the same atomic manifest replace as the index files), so no side file can disagree
with it. Every ``compact_every`` writes, and at a clean shutdown, the index is saved again. Thumbnails are a per-item
attribute of the index (index/thumbnails.py) like the payload, stored in the row and saved with the snapshot.

A backend that owns its durability (Milvus; the index class says ``owns_durability = True``): no local database is
opened and ``save()`` is never called; ``add(ids, vectors, payloads=, thumbnails=)`` and ``remove(ids)`` are durable
when they return, and thumbnails are read back from the backend. Validation (index/validation.py) runs in ``upsert``
before either path, so no backend ever sees what a single node would refuse.

Consistency: writers are serialised by one mutex, so the database order is the order of application; searches
and reads share a readers-writer lock that a write takes exclusively only while it changes the in-memory state
(not while it waits for fsync), so a search sees each write entirely or not at all and searches run in parallel.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from index.rwlock import RWLock
from index.store import MANIFEST
from index.validation import check_ids, check_payloads, check_thumbnails, check_vectors
from serve.durable_log import (
    DB_NAME,
    CorruptStoreError,
    ItemLog,
    Row,
    StoreClosedError,
    StoreError,
    WrongDimensionError,
    encode_payload,
)

log = logging.getLogger("lpjepa.serve")

SEQ_KEY = "serve_seq"  # index.metadata key: the database sequence number the snapshot includes

__all__ = ["DB_NAME", "CorruptStoreError", "Hit", "ItemStore", "StoreError", "StoredItem"]


def rows_to_csr(rows: list[tuple[np.ndarray, np.ndarray]], dim: int) -> sparse.csr_matrix:
    """One float32 CSR matrix of sparse rows given as (int32 indices, float32 values)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([r[0].size for r in rows])
    indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32)
    data = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), dim), dtype=np.float32)


@dataclass
class Hit:
    id: int
    score: float
    payload: dict[str, Any] | None
    thumbnail: bytes | None = None


@dataclass
class StoredItem:
    id: int
    payload: dict[str, Any] | None
    vector: tuple[np.ndarray, np.ndarray] | None  # (indices, values) when the index can return it
    thumbnail: bytes | None


class ItemStore:
    """Index + durable database (or a self-durable backend). Thread-safe; may block on I/O."""

    def __init__(
        self,
        directory: Path | None,
        index: Any,
        *,
        dim: int,
        compact_every: int,
        metrics: Any = None,
        db: ItemLog | None = None,
    ) -> None:
        self.directory = directory
        self.index = index
        self.dim = dim
        self.compact_every = compact_every
        self.metrics = metrics
        self.db = db
        self._writer = threading.Lock()  # one writer at a time: database order == apply order
        self._rw = RWLock()  # readers: search/get; writer: applying a write (never held across fsync)
        self.snapshot_seq = int((getattr(index, "metadata", None) or {}).get(SEQ_KEY, 0))
        self.snapshots = 0
        self.replayed = 0
        self._closed = False

    @property
    def backend_durable(self) -> bool:
        return bool(getattr(self.index, "owns_durability", False))

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        dim: int,
        backend: str = "csr",
        metric: str = "cosine",
        compact_every: int = 1000,
        metrics: Any = None,
    ) -> ItemStore:
        """Load the snapshot in `directory` (or create an empty index there) and apply the later writes over it."""
        from index.factory import create_index, load_index
        from serve.migrate import LEGACY_WAL, migrate_legacy

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"index path {directory} exists and is not a directory")
        try:
            if (directory / MANIFEST).is_file():
                index = load_index(directory, expected_dim=dim)
            else:
                # A new index is saved before the database exists: the index refuses to write into a directory
                # that holds files it does not know and no manifest.
                index = create_index(backend=backend, dim=dim, metric=metric)
                index.save(directory)
        except ValueError as err:  # the index package's errors (corrupt files, wrong format, bad options)
            raise StoreError(str(err)) from err  # (a self-durable backend has no directory: open_backend)
        db_path = directory / DB_NAME
        if (directory / LEGACY_WAL).exists():
            if db_path.exists():
                log.warning("%s: ignoring %s, the database %s already holds the writes", directory, LEGACY_WAL, DB_NAME)
            else:
                index = migrate_legacy(directory, index, dim=dim)
        db = ItemLog.open(db_path, dim=dim)
        store = cls(directory, index, dim=dim, compact_every=compact_every, metrics=metrics, db=db)
        if store.snapshot_seq > db.last_seq:
            db.close()
            raise CorruptStoreError(
                db_path,
                f"the index snapshot includes writes up to number {store.snapshot_seq} but the database ends at "
                f"{db.last_seq}: acknowledged writes are missing from it",
            )
        try:
            for rows in db.rows_after(store.snapshot_seq):
                store._apply_rows(rows)
                store.replayed += len(rows)
        except ValueError as err:
            db.close()
            if isinstance(err, CorruptStoreError):
                raise
            raise CorruptStoreError(db_path, f"a stored write cannot be applied to the index ({err})") from None
        if store.replayed:
            log.info("applied %d stored writes over the snapshot in %s", store.replayed, directory)
        index.prepare()  # search structures and compiled kernels now, not in the first request
        return store

    @classmethod
    def open_backend(cls, index: Any, *, dim: int, metrics: Any = None) -> ItemStore:
        """A store over an index that owns its durability (Milvus) and has no directory: nothing local at all."""
        if not getattr(index, "owns_durability", False):
            raise StoreError(f"the {getattr(index, 'backend', '?')} backend keeps no durable state of its own")
        if index.dim != dim:
            raise WrongDimensionError(f"the index has dimension {index.dim} but the model produces {dim}")
        store = cls(None, index, dim=dim, compact_every=1, metrics=metrics)
        index.prepare()
        return store

    def ping(self) -> None:
        """Raise (BackendUnavailableError) when the backend does not answer; a no-op for in-process indexes."""
        ping = getattr(self.index, "ping", None)
        if ping is not None:
            ping()

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: sparse.csr_matrix, k: int, thumbnails: bool = False) -> list[Hit]:
        """Top-k of one query row, best first; fewer when the index holds fewer items."""
        if self.db is None and hasattr(self.index, "search_items"):  # one round trip to a remote backend
            found = self.index.search_items(queries, k, thumbnails=thumbnails)
            return [Hit(id=i, score=sc, payload=p, thumbnail=t) for i, sc, p, t in found]
        with self._rw.read():
            scores, ids = self.index.search(queries, k)
            keep = ids[0] >= 0
            ids_row, scores_row = ids[0][keep], scores[0][keep]
            payloads = self.index.payloads(ids_row) if ids_row.size else []
            thumbs = self.index.thumbnails(ids_row) if thumbnails and ids_row.size else [None] * ids_row.size
            return [
                Hit(id=int(i), score=float(sc), payload=p, thumbnail=t)
                for i, sc, p, t in zip(ids_row, scores_row, payloads, thumbs, strict=True)
            ]

    def get(self, item_id: int) -> StoredItem | None:
        if self.db is None and hasattr(self.index, "items"):  # one round trip to a remote backend
            item = self.index.items([item_id]).get(item_id)
            if item is None:
                return None
            return StoredItem(item_id, item["payload"], (item["indices"], item["values"]), item["thumbnail"])
        with self._rw.read():
            if not self.index.contains([item_id])[0]:
                return None
            row = self.index.reconstruct([item_id])
            return StoredItem(
                id=item_id,
                payload=self.index.payload(item_id),
                vector=(row.indices.astype(np.int64), row.data.astype(np.float32)),
                thumbnail=self.index.thumbnails([item_id])[0],
            )

    @property
    def pending(self) -> int:
        """Writes since the last snapshot (what a restart replays)."""
        return 0 if self.db is None else self.db.last_seq - self.snapshot_seq

    def describe(self) -> dict[str, Any]:
        return {
            "size": len(self.index),
            "dim": self.dim,
            "metric": self.index.metric,
            "backend": getattr(self.index, "backend", None),
            "directory": None if self.directory is None else str(self.directory),
            "collection": getattr(self.index, "collection", None),
            "durability": "backend" if self.db is None else "sqlite",
            "wal_records": self.pending,
            "snapshots": self.snapshots,
        }

    def upsert(
        self,
        ids: np.ndarray,
        matrix: sparse.csr_matrix,
        payloads: list[dict[str, Any] | None],
        thumbs: list[bytes | None] | None,
    ) -> tuple[int, int]:
        """Add or replace items; durable (fsynced, or acknowledged by the backend) when it returns.

        Returns (created, replaced). Everything the index would refuse is refused here, before anything is
        stored: a stored write must apply, on this run and on every restart.
        """
        try:
            ids = check_ids(ids)
            matrix = sparse.csr_matrix(check_vectors(matrix, self.dim, what="embeddings"))
            payloads = check_payloads(payloads, ids.size) or [None] * ids.size
            thumbs = check_thumbnails(thumbs, ids.size) or [None] * ids.size
            texts = [encode_payload(p) for p in payloads]
        except (ValueError, UnicodeEncodeError) as err:
            kind = WrongDimensionError if "dimension" in str(err) else StoreError
            raise kind(str(err)) from err
        with self._writer:
            self._check_open()
            replaced = int(self.index.contains(ids).sum())
            if self.db is None:
                self.index.add(ids, matrix, payloads=payloads, thumbnails=thumbs)
            else:
                self.db.upsert(ids, matrix, texts, thumbs)
                self._count_write(ids.size)
                with self._rw.write():
                    self.index.add(ids, matrix, payloads=payloads, thumbnails=thumbs)  # replaces existing ids
            self._written()
        return int(ids.size) - replaced, replaced

    def delete(self, item_id: int) -> bool:
        """Remove one item; False when it does not exist (nothing is stored then)."""
        with self._writer:
            self._check_open()
            ids = check_ids([item_id])
            if not self.index.contains(ids)[0]:
                return False
            if self.db is None:
                self.index.remove(ids)
            else:
                self.db.delete(ids.tolist())
                self._count_write(1)
                with self._rw.write():
                    self.index.remove(ids)
            self._written()
            return True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the index is closed (server shutting down)")

    def _count_write(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.wal_records.inc(n)

    def _apply_rows(self, rows: list[Row]) -> None:
        """Set each row's id to its stored state; idempotent, and order-free (one row per id)."""
        live = [r for r in rows if not r.deleted]
        dead = np.asarray([r.id for r in rows if r.deleted], dtype=np.int64)
        if dead.size:
            present = dead[self.index.contains(dead)]
            if present.size:
                self.index.remove(present)
        if live:
            self.index.add(
                np.asarray([r.id for r in live], np.int64),
                rows_to_csr([(r.indices, r.values) for r in live], self.dim),
                payloads=[r.payload for r in live],
                thumbnails=[r.thumbnail for r in live],
            )

    def _written(self) -> None:
        if self.metrics is not None:
            self.metrics.index_size.set(len(self.index))
        if self.pending >= self.compact_every:
            self.snapshot()

    def snapshot(self) -> None:
        """Save the index atomically with the sequence number it includes (the database is left as it is).

        Called with the writer mutex held (or before serving): no write can slip in between.
        """
        if self.db is None:
            return
        seq = self.db.last_seq
        self.index.metadata[SEQ_KEY] = seq
        self.index.save(self.directory)  # atomic: a new generation committed by replacing its manifest
        self.snapshot_seq = seq
        self.snapshots += 1
        if self.metrics is not None:
            self.metrics.compactions.inc()

    def close(self) -> None:
        """Snapshot and release the database; later writes are refused (StoreClosedError)."""
        with self._writer:
            if self._closed:
                return
            if self.pending:
                self.snapshot()
            if self.db is not None:
                self.db.close()
            if self.backend_durable and hasattr(self.index, "close"):
                self.index.close()
            self._closed = True
