"""One-time migration of the earlier hand-rolled log (serve-wal.log + serve-state.json + serve-thumbnails.json).

The old reader stopped at the first bad record and truncated the rest, so a flipped byte in the middle of the
log silently dropped every later acknowledged write. This reader is strict: only a *torn tail* (a partial header
or a record shorter than its declared length, which is what a kill during a write leaves) is dropped; any other
damage (bad magic, checksum mismatch, sequence out of order) refuses the migration with the file named, unless
the operator asked for a salvage (`lpjepa index repair`), which keeps the intact records before the damage and
says how many bytes it gave up.

Migration: the snapshot is loaded, the log's records after the snapshot's sequence number are applied in memory,
and every id the log touched (plus every id with a thumbnail) is written as one row of the new database, in one
transaction; the database file is created under a temporary name and renamed into place, then the snapshot is
saved to say it includes those rows, and the old files are renamed to ``*.migrated``. A kill at any step either
leaves the old files in charge (no database yet) or a complete database whose rows re-apply idempotently.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from core.atomic_io import fsync_path
from serve.durable_log import DB_NAME, CorruptStoreError, ItemLog, StoreError, StoreUnavailableError, encode_payload

log = logging.getLogger("lpjepa.serve")

LEGACY_WAL = "serve-wal.log"
LEGACY_STATE = "serve-state.json"
LEGACY_THUMBS = "serve-thumbnails.json"
_MAGIC = b"LPW1"
_HEADER = struct.Struct("<4sIQI")  # magic | u32 body length | u64 sequence | u32 crc32(sequence, body)
_U32 = struct.Struct("<I")


def legacy_crc(seq: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(struct.pack("<Q", seq))) & 0xFFFFFFFF


def read_legacy_log(path: Path, *, salvage: bool = False) -> tuple[list[tuple[int, bytes]], int]:
    """The intact records and the number of bytes dropped (a torn tail, or with `salvage` any damage onwards)."""
    data = path.read_bytes()
    records: list[tuple[int, bytes]] = []
    offset = 0
    previous = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            return records, len(data) - offset  # torn header: never acknowledged
        magic, length, seq, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        problem = None
        if magic != _MAGIC:
            problem = "a bad record header"
        elif end > len(data):
            return records, len(data) - offset  # torn body: never acknowledged
        elif legacy_crc(seq, data[offset + _HEADER.size : end]) != crc:
            problem = "a checksum mismatch"
        elif seq <= previous:
            problem = f"sequence number {seq} after {previous}"
        if problem is not None:
            if salvage:
                log.error("%s: dropping %d bytes from offset %d (%s)", path, len(data) - offset, offset, problem)
                return records, len(data) - offset
            raise CorruptStoreError(
                path,
                f"{problem} at byte {offset} of {len(data)} (record {len(records) + 1}); the records after it "
                "were acknowledged and would be lost",
            )
        records.append((seq, data[offset + _HEADER.size : end]))
        previous = seq
        offset = end
    return records, 0


def decode_legacy_record(body: bytes) -> dict[str, Any]:
    (hlen,) = _U32.unpack_from(body, 0)
    head = json.loads(body[4 : 4 + hlen])
    if head["op"] == "delete":
        head["ids"] = np.asarray(head["ids"], dtype=np.int64)
        return head
    n, nnz, dim = head["n"], head["nnz"], head["dim"]
    parts, off = [], 4 + hlen
    for dtype, count in (("<i8", n), ("<i8", n + 1), ("<i4", nnz), ("<f4", nnz)):  # ids, indptr, indices, data
        parts.append(np.frombuffer(body, dtype, count, off))
        off += np.dtype(dtype).itemsize * count
    ids, indptr, indices, data = parts
    head["ids"] = ids.astype(np.int64)
    head["matrix"] = sparse.csr_matrix(
        (data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int64)), shape=(n, dim)
    )
    head["thumbs"] = [None if t is None else base64.b64decode(t) for t in head["thumbs"]]
    return head


def migrate_legacy(directory: Path, index: Any, *, dim: int, salvage: bool = False) -> Any:
    """Move the old log's state into ``serve.sqlite3``; returns the index with the log applied (and saved)."""
    from serve.store import SEQ_KEY

    wal_path = directory / LEGACY_WAL
    log.warning("%s: migrating the old write-ahead log %s to the SQLite database %s", directory, LEGACY_WAL, DB_NAME)
    applied, thumbs = _read_legacy_state(directory)
    records, dropped = read_legacy_log(wal_path, salvage=salvage)
    if dropped:
        log.warning("%s: %d bytes at the end of the old log were a torn (never acknowledged) write", wal_path, dropped)
    try:
        touched, n_records = _apply_records(index, records, applied, thumbs, wal_path)
        thumbs = {i: t for i, t in thumbs.items() if index.contains([i])[0]}
        for i, thumb in thumbs.items():  # side-file thumbnails of snapshot items the log did not touch
            if i not in touched:
                row = index.reconstruct([i])
                index.add([i], row, payloads=[index.payload(i)], thumbnails=[thumb])
        touched.update(thumbs)
        ordered = sorted(touched)
        live = np.asarray([i for i in ordered if index.contains([i])[0]], dtype=np.int64)
        dead = [i for i in ordered if not index.contains([i])[0]]
    except ValueError as err:  # a record or thumbnail the index refuses: the old state is not what was written
        raise CorruptStoreError(wal_path, f"the old state cannot be applied ({err})") from None
    index.metadata[SEQ_KEY] = _write_database(directory, index, live, dead, dim=dim, wal_path=wal_path)
    index.save(directory)
    for name in (LEGACY_WAL, LEGACY_STATE, LEGACY_THUMBS):
        if (directory / name).exists():
            os.replace(directory / name, directory / f"{name}.migrated")
    fsync_path(directory)
    log.warning(
        "%s: migrated %d old log records (%d items, %d deletions, %d thumbnails) into %s; the old files are kept as "
        "*.migrated and can be deleted",
        directory,
        n_records,
        live.size,
        len(dead),
        len(thumbs),
        DB_NAME,
    )
    return index


def _read_legacy_state(directory: Path) -> tuple[int, dict[int, bytes]]:
    """The old snapshot's sequence number and the thumbnail side file."""
    try:
        state_path, thumbs_path = directory / LEGACY_STATE, directory / LEGACY_THUMBS
        applied = int(json.loads(state_path.read_text())["applied_seq"]) if state_path.is_file() else 0
        raw_thumbs = json.loads(thumbs_path.read_text()) if thumbs_path.is_file() else {}
        return applied, {int(k): base64.b64decode(v) for k, v in raw_thumbs.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptStoreError(directory / LEGACY_STATE, f"unreadable old server state ({err})") from None


def _apply_records(
    index: Any, records: list[tuple[int, bytes]], applied: int, thumbs: dict[int, bytes], wal_path: Path
) -> tuple[set[int], int]:
    """Apply the records after the snapshot to the index (and `thumbs`); returns the ids touched and the count."""
    touched: set[int] = set()
    n_records = 0
    for seq, body in records:
        if seq <= applied:
            continue  # already in the snapshot
        try:
            record = decode_legacy_record(body)
        except (ValueError, KeyError, struct.error) as err:
            raise CorruptStoreError(wal_path, f"record {seq} cannot be decoded ({err})") from None
        ids = record["ids"]
        if record["op"] == "upsert":
            index.add(ids, record["matrix"], payloads=list(record["payloads"]), thumbnails=record["thumbs"])
            for i, thumb in zip(ids.tolist(), record["thumbs"], strict=True):
                if thumb is None:
                    thumbs.pop(i, None)
                else:
                    thumbs[i] = thumb
        else:
            present = ids[index.contains(ids)]
            if present.size:
                index.remove(present)
            for i in ids.tolist():
                thumbs.pop(i, None)
        touched.update(ids.tolist())
        n_records += 1
    return touched, n_records


def _write_database(directory: Path, index: Any, live: np.ndarray, dead: list[int], *, dim: int, wal_path: Path) -> int:
    """Write one row per touched id into a new database under a temporary name, then rename it into place;
    returns its last sequence number."""
    tmp = directory / f"{DB_NAME}.migrating"
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}.lock")):
        stale.unlink(missing_ok=True)
    db = ItemLog.open(tmp, dim=dim)
    try:
        if live.size:
            matrix = index.reconstruct(live)
            payloads = index.payloads(live)
            db.upsert(live, matrix, [encode_payload(p) for p in payloads], index.thumbnails(live))
        if dead:
            db.delete(dead)
        last = db.last_seq
    except (StoreError, StoreUnavailableError, ValueError) as err:
        db.close()
        raise CorruptStoreError(wal_path, f"the old state cannot be stored ({err})") from None
    db.close()  # checkpointed into the one file: it can be renamed alone
    Path(f"{tmp}.lock").unlink(missing_ok=True)
    os.replace(tmp, directory / DB_NAME)
    fsync_path(directory)
    return last
