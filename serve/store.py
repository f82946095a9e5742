"""The served index: searches, durable writes and snapshots, behind one lock.

Durability: every write is appended to a write-ahead log (serve/wal.py) and fsynced before the reply, then
applied to the in-memory index. On start-up the last snapshot (the index directory as `index.save` wrote it) is
loaded and the log replayed over it. Every `compact_every` records, and at a clean shutdown, the index is saved
again (atomically, by the index package) and the log emptied. Writes are idempotent "set"/"delete" operations,
so replaying records a snapshot already contains (a kill between the save and the log reset) is harmless.

Consistency: writers are serialised by one mutex, so the log order is the order of application; searches and
reads share a readers-writer lock that a write takes exclusively only while it changes the in-memory state
(not while it waits for fsync), so a search sees each write entirely or not at all and searches run in
parallel with each other.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from index.rwlock import RWLock
from index.store import MANIFEST
from index.validation import check_ids, check_payloads, check_vectors
from models.atomic_io import atomic_write_text
from serve.wal import WriteAheadLog

log = logging.getLogger("lpjepa.serve")

WAL_NAME = "serve-wal.log"
STATE_NAME = "serve-state.json"
THUMBS_NAME = "serve-thumbnails.json"
STATE_FORMAT = "lpjepa-serve-state/1"


class StoreError(ValueError):
    """A write the store refuses (e.g. wrong dimension); carries the HTTP status the API should answer with."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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


# ------------------------------------------------------------------------------------------ record codec
_U32 = struct.Struct("<I")


def encode_upsert(
    ids: np.ndarray, matrix: sparse.csr_matrix, payloads: list[dict[str, Any] | None], thumbs: list[bytes | None]
) -> bytes:
    head = {
        "op": "upsert",
        "n": int(ids.size),
        "dim": int(matrix.shape[1]),
        "nnz": int(matrix.nnz),
        "payloads": payloads,
        "thumbs": [None if t is None else base64.b64encode(t).decode() for t in thumbs],
    }
    hjson = json.dumps(head, separators=(",", ":")).encode()
    return b"".join(
        [
            _U32.pack(len(hjson)),
            hjson,
            ids.astype("<i8").tobytes(),
            matrix.indptr.astype("<i8").tobytes(),
            matrix.indices.astype("<i4").tobytes(),
            matrix.data.astype("<f4").tobytes(),
        ]
    )


def encode_delete(ids: np.ndarray) -> bytes:
    hjson = json.dumps({"op": "delete", "ids": [int(i) for i in ids]}).encode()
    return _U32.pack(len(hjson)) + hjson


def decode_record(body: bytes) -> dict[str, Any]:
    (hlen,) = _U32.unpack_from(body, 0)
    head = json.loads(body[4 : 4 + hlen])
    if head["op"] == "delete":
        head["ids"] = np.asarray(head["ids"], dtype=np.int64)
        return head
    n, nnz, dim = head["n"], head["nnz"], head["dim"]
    off = 4 + hlen
    ids = np.frombuffer(body, "<i8", n, off)
    off += 8 * n
    indptr = np.frombuffer(body, "<i8", n + 1, off)
    off += 8 * (n + 1)
    indices = np.frombuffer(body, "<i4", nnz, off)
    off += 4 * nnz
    data = np.frombuffer(body, "<f4", nnz, off)
    head["ids"] = ids.astype(np.int64)
    head["matrix"] = sparse.csr_matrix(
        (data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int64)), shape=(n, dim)
    )
    head["thumbs"] = [None if t is None else base64.b64decode(t) for t in head["thumbs"]]
    return head


# ------------------------------------------------------------------------------------------ the store
class ItemStore:
    """Index + thumbnails with write-ahead durability (payloads live in the index). Thread-safe; may block on I/O."""

    def __init__(self, directory: Path, index: Any, *, dim: int, compact_every: int, metrics: Any = None) -> None:
        self.directory = directory
        self.index = index
        self.dim = dim
        self.compact_every = compact_every
        self.metrics = metrics
        self._writer = threading.Lock()  # one writer at a time: log order == apply order
        self._rw = RWLock()  # readers: search/get; writer: applying a record (never held across fsync)
        self.thumbs: dict[int, bytes] = {}
        self.wal = WriteAheadLog(directory / WAL_NAME)
        self.applied_seq = 0
        self.snapshots = 0
        self.replayed = 0
        self._closed = False

    # -------------------------------------------------------------------- opening
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
        """Load the snapshot in `directory` (or create an empty index there) and replay the log over it."""
        from index.factory import create_index, load_index

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"index path {directory} exists and is not a directory")
        try:
            if (directory / MANIFEST).is_file():
                index = load_index(directory, expected_dim=dim)
            else:
                # A new index is saved before the log exists: the index refuses to write into a directory that
                # holds files it does not know and no manifest.
                index = create_index(backend=backend, dim=dim, metric=metric)
                index.save(directory)
        except ValueError as err:  # the index package's errors (corrupt files, wrong format, bad options)
            raise StoreError(str(err)) from err
        store = cls(directory, index, dim=dim, compact_every=compact_every, metrics=metrics)
        store._load_side_files()
        for seq, body in store.wal.open(min_seq=store.applied_seq):
            if seq <= store.applied_seq:
                continue  # already in the snapshot (a kill between the snapshot and the log reset)
            try:
                store._apply(decode_record(body))
                store.replayed += 1
            except (ValueError, KeyError, struct.error) as err:
                log.error("write-ahead log record %d in %s could not be applied: %s", seq, directory, err)
        if store.replayed:
            log.info("replayed %d write-ahead log records over the snapshot in %s", store.replayed, directory)
        index.prepare()  # search structures and compiled kernels now, not in the first request
        return store

    def _load_side_files(self) -> None:
        state_path = self.directory / STATE_NAME
        try:
            if state_path.is_file():
                self.applied_seq = int(json.loads(state_path.read_text())["applied_seq"])
            thumbs_path = self.directory / THUMBS_NAME
            if thumbs_path.is_file():
                raw = json.loads(thumbs_path.read_text())
                self.thumbs = {int(k): base64.b64decode(v) for k, v in raw.items() if self.index.contains([int(k)])[0]}
        except (ValueError, KeyError, TypeError) as err:  # written atomically, so only tampering gets here
            raise StoreError(f"{self.directory}: unreadable server state ({err})") from err

    # -------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item_id: int) -> bool:
        return bool(self.index.contains([int(item_id)])[0])

    def search(self, queries: sparse.csr_matrix, k: int, thumbnails: bool = False) -> list[Hit]:
        """Top-k of one query row, best first; fewer when the index holds fewer items."""
        with self._rw.read():
            scores, ids = self.index.search(queries, k)
            keep = ids[0] >= 0
            ids_row, scores_row = ids[0][keep], scores[0][keep]
            payloads = self.index.payloads(ids_row) if ids_row.size else []
            return [
                Hit(
                    id=int(i),
                    score=float(sc),
                    payload=p,
                    thumbnail=self.thumbs.get(int(i)) if thumbnails else None,
                )
                for i, sc, p in zip(ids_row, scores_row, payloads, strict=True)
            ]

    def get(self, item_id: int) -> StoredItem | None:
        with self._rw.read():
            if not self.index.contains([item_id])[0]:
                return None
            row = self.index.reconstruct([item_id])
            return StoredItem(
                id=item_id,
                payload=self.index.payload(item_id),
                vector=(row.indices.astype(np.int64), row.data.astype(np.float32)),
                thumbnail=self.thumbs.get(item_id),
            )

    def describe(self) -> dict[str, Any]:
        return {
            "size": len(self.index),
            "dim": self.dim,
            "metric": self.index.metric,
            "backend": getattr(self.index, "backend", None),
            "directory": str(self.directory),
            "wal_records": self.wal.records,
            "snapshots": self.snapshots,
        }

    # -------------------------------------------------------------------- writes
    def upsert(
        self,
        ids: np.ndarray,
        matrix: sparse.csr_matrix,
        payloads: list[dict[str, Any] | None],
        thumbs: list[bytes | None],
    ) -> tuple[int, int]:
        """Add or replace items; durable (fsynced) when it returns. Returns (created, replaced)."""
        # Everything the index would refuse is refused here, before the record is logged: a logged record
        # must apply, on this run and on every replay.
        try:
            ids = check_ids(ids)
            matrix = sparse.csr_matrix(check_vectors(matrix, self.dim, what="embeddings"))
            payloads = check_payloads(payloads, ids.size) or [None] * ids.size
        except ValueError as err:
            code = "wrong_dimension" if "dimension" in str(err) else "invalid_request"
            raise StoreError(str(err), code=code) from err
        if len(thumbs) != ids.size:
            raise StoreError(f"got {len(thumbs)} thumbnail slots for {ids.size} ids")
        body = encode_upsert(ids, matrix, payloads, thumbs)
        with self._writer:
            self._check_open()
            replaced = int(self.index.contains(ids).sum())
            self._log(body)
            self._apply({"op": "upsert", "ids": ids, "matrix": matrix, "payloads": payloads, "thumbs": thumbs})
            self._maybe_compact()
        return int(ids.size) - replaced, replaced

    def delete(self, item_id: int) -> bool:
        """Remove one item; False when it does not exist (nothing is logged then)."""
        with self._writer:
            self._check_open()
            ids = check_ids([item_id])
            if not self.index.contains(ids)[0]:
                return False
            self._log(encode_delete(ids))
            self._apply({"op": "delete", "ids": ids})
            self._maybe_compact()
            return True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the index is closed (server shutting down)", status=503, code="shutting_down")

    def _log(self, body: bytes) -> None:
        self.wal.append(body)
        if self.metrics is not None:
            self.metrics.wal_records.inc()

    def _apply(self, record: dict[str, Any]) -> None:
        """Idempotent: replaying a record the snapshot already holds leaves the same state."""
        ids = record["ids"]
        with self._rw.write():
            if record["op"] == "upsert":
                self.index.add(ids, record["matrix"], payloads=list(record["payloads"]))  # replaces existing ids
                for i, thumb in zip(ids.tolist(), record["thumbs"], strict=True):
                    if thumb is None:
                        self.thumbs.pop(i, None)
                    else:
                        self.thumbs[i] = thumb
            else:
                present = ids[self.index.contains(ids)]
                if present.size:
                    self.index.remove(present)
                for i in ids.tolist():
                    self.thumbs.pop(i, None)
        if self.metrics is not None:
            self.metrics.index_size.set(len(self.index))

    def _maybe_compact(self) -> None:
        if self.wal.records >= self.compact_every:
            self.snapshot()

    def snapshot(self) -> None:
        """Save the index and side files atomically, then empty the log (its records are all in the snapshot).

        Called with the writer mutex held (or before serving): no write can slip between the save and the reset.
        """
        seq = self.wal.last_seq
        self.index.save(self.directory)  # atomic: a new generation committed by replacing its manifest
        with self._rw.read():
            thumbs = {str(k): base64.b64encode(v).decode() for k, v in self.thumbs.items()}
        atomic_write_text(self.directory / THUMBS_NAME, json.dumps(thumbs))
        state = {"format": STATE_FORMAT, "applied_seq": seq, "size": len(self.index)}
        atomic_write_text(self.directory / STATE_NAME, json.dumps(state))
        self.applied_seq = seq
        self.wal.reset()
        self.snapshots += 1
        if self.metrics is not None:
            self.metrics.compactions.inc()

    def close(self) -> None:
        """Snapshot and release the log; later writes are refused with 503."""
        with self._writer:
            if self._closed:
                return
            if self.wal.records:
                self.snapshot()
            self.wal.close()
            self._closed = True
