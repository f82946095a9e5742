"""The single-node server's durable state: one SQLite database, ``INDEX_DIR/serve.sqlite3``, holding every write.

Why SQLite and not a hand-rolled log: it is the most tested storage engine there is, its WAL journal with
``synchronous=FULL`` makes a COMMIT return only after the journal frame is fsynced (so a 2xx survives SIGKILL and
power loss), and ``PRAGMA integrity_check`` finds structural damage. What SQLite does not check is the *content* of
a row (it keeps no page checksums), so every row carries a CRC32 of its fields, verified at start-up.

Layout:

    meta(key TEXT PRIMARY KEY, value TEXT)       format, dim, last_seq (the last write's sequence number)
    items(id INTEGER PRIMARY KEY,                the item id (int64, as the index stores it)
          seq INTEGER NOT NULL UNIQUE,           sequence number of the write that produced this row
          deleted INTEGER NOT NULL,              1: a tombstone (the item was deleted)
          indices BLOB, vals BLOB,               the sparse vector: little-endian int32 dims, float32 values
          payload TEXT,                          the payload as strict JSON, NULL for none
          thumbnail BLOB,                        PNG bytes, NULL for none
          crc INTEGER NOT NULL)                  CRC32 of all the fields above

One row per id holds its latest state, and ``seq`` grows with every write, so "the writes after the snapshot
that covers sequence S" are the rows with ``seq > S``; applying them in any order gives the same index, because
no id appears twice. The database is never compacted: it is the record of everything written through the
server (the index snapshot beside it only saves replay time).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import sparse

from core.atomic_io import fsync_path
from core.errors import InvalidError, UnavailableError

log = logging.getLogger("lpjepa.serve")

DB_NAME = "serve.sqlite3"
DB_FORMAT = "lpjepa-serve-db/1"
REPAIR_HINT = (
    "recover with `lpjepa index repair {dir}` (keeps every intact row and moves the damaged file aside) "
    "or restore {path} from a backup"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    indices BLOB,
    vals BLOB,
    payload TEXT,
    thumbnail BLOB,
    crc INTEGER NOT NULL
);
"""
_COLUMNS = "id, seq, deleted, indices, vals, payload, thumbnail, crc"
_HEAD = struct.Struct("<qqB")
_LEN = struct.Struct("<q")


class StoreError(InvalidError):
    """A write or an index directory the store refuses (e.g. a wrong dimension, a file in the way)."""

    code: ClassVar[str] = "invalid_request"  # the failure's name (the API's error code, serve/errors.py)


class WrongDimensionError(StoreError):
    """Vectors or a database of another width than the model's."""

    code = "wrong_dimension"


class StoreLockedError(StoreError):
    """Another server process holds the database."""

    code = "store_locked"


class CorruptStoreError(StoreError):
    """The durable state on disk is damaged or inconsistent: the server refuses to start rather than lose rows."""

    code = "corrupt_store"

    def __init__(self, path: Path, what: str) -> None:
        hint = REPAIR_HINT.format(dir=path.parent, path=path)
        super().__init__(f"{path}: {what}; the server will not start on damaged state: {hint}")
        self.path = path


class StoreUnavailableError(UnavailableError):
    """The database could not commit a write (nothing was changed): the request may be retried."""


class StoreClosedError(StoreUnavailableError):
    """The store was closed (the server is shutting down)."""


@dataclass
class Row:
    """One item's latest state as the database holds it."""

    id: int
    seq: int
    deleted: bool
    indices: np.ndarray | None  # int32
    values: np.ndarray | None  # float32
    payload: Any
    thumbnail: bytes | None


def row_crc(item_id: int, seq: int, deleted: int, *data: bytes | str | None) -> int:
    """CRC32 over every field (the data: indices, vals, payload, thumbnail), each length-prefixed (-1 for NULL) so
    that no two different rows encode alike."""
    crc = zlib.crc32(_HEAD.pack(item_id, seq, deleted))
    for field in data:
        part = field.encode("utf-8") if isinstance(field, str) else field
        crc = zlib.crc32(_LEN.pack(-1 if part is None else len(part)), crc)
        if part:
            crc = zlib.crc32(part, crc)
    return crc


def encode_payload(payload: Any) -> str | None:
    """Strict JSON text (no NaN, valid UTF-8 all the way): what the database stores is what a reader gets back."""
    if payload is None:
        return None
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    text.encode("utf-8")  # raises on a lone surrogate: it must never reach the database
    return text


def _decode_row(raw: tuple, path: Path) -> Row:
    item_id, seq, deleted, indices, vals, payload, thumb, crc = raw
    typed = (
        all(isinstance(v, int) for v in (item_id, seq, deleted, crc))
        and all(v is None or isinstance(v, bytes) for v in (indices, vals, thumb))
        and (payload is None or isinstance(payload, str))
    )
    if not typed:  # a flipped type byte in the record header changes what SQLite hands back
        raise CorruptStoreError(path, f"a row (item {item_id!r}) holds values of the wrong type")
    if row_crc(item_id, seq, deleted, indices, vals, payload, thumb) != crc:
        raise CorruptStoreError(path, f"the row of item {item_id} (write {seq}) fails its checksum")
    try:
        idx = None if indices is None else np.frombuffer(indices, "<i4").astype(np.int32)
        val = None if vals is None else np.frombuffer(vals, "<f4").astype(np.float32)
        body = None if payload is None else json.loads(payload)
    except ValueError as err:
        raise CorruptStoreError(path, f"the row of item {item_id} cannot be decoded ({err})") from None
    if not deleted and (idx is None or val is None or idx.size != val.size):
        raise CorruptStoreError(path, f"the row of item {item_id} has no valid vector")
    return Row(int(item_id), int(seq), bool(deleted), idx, val, body, thumb)


class ItemLog:
    """The database: ``write`` commits (fsynced) before it returns; one writer at a time (the store's mutex)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, dim: int, last_seq: int, lock_fd: int | None = None):
        self.path = path
        self.dim = dim
        self.last_seq = last_seq
        self._conn = conn
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, dim: int) -> ItemLog:
        """Open (or create) the database and check it whole: structure, meta, every row's checksum."""
        path = Path(path)
        lock_fd = acquire_lock(path)
        try:
            return cls._open_locked(path, dim=dim, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, *, dim: int, lock_fd: int) -> ItemLog:
        created = not path.exists()
        check_journal(path)  # before SQLite opens it: it would drop the frames after a damaged one
        conn = None
        try:
            conn = _connect(path)
            if created:
                with conn:
                    conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [("format", DB_FORMAT), ("dim", str(dim)), ("last_seq", "0")],
                    )
                fsync_path(path.parent)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            if conn is not None:
                conn.close()
            raise CorruptStoreError(path, f"not a readable SQLite database ({err})") from None
        out = cls(path, conn, dim, 0, lock_fd)
        try:
            out._check_meta(meta, dim)
            out.verify()
        except BaseException:
            conn.close()
            raise
        return out

    def _check_meta(self, meta: dict[str, str], dim: int) -> None:
        path = self.path
        if meta.get("format") != DB_FORMAT:
            raise CorruptStoreError(path, f"unknown format {meta.get('format')!r} (expected {DB_FORMAT})")
        try:
            stored_dim, last_seq = int(meta["dim"]), int(meta["last_seq"])
        except (KeyError, ValueError):
            raise CorruptStoreError(path, f"meta table is damaged ({meta})") from None
        if stored_dim != dim:
            raise WrongDimensionError(f"{path} holds {stored_dim}-dimensional items but the model produces {dim}")
        self.last_seq = last_seq

    def verify(self) -> None:
        """PRAGMA integrity_check, then every row's checksum and sequence number."""
        try:
            problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check(20)").fetchall()]
            if problems != ["ok"]:
                raise CorruptStoreError(self.path, "integrity_check failed: " + "; ".join(problems[:5]))
            max_seq = 0
            for raw in self._conn.execute(f"SELECT {_COLUMNS} FROM items"):
                max_seq = max(max_seq, _decode_row(raw, self.path).seq)
        except sqlite3.DatabaseError as err:
            raise CorruptStoreError(self.path, f"reading the database failed ({err})") from None
        if max_seq > self.last_seq:
            raise CorruptStoreError(self.path, f"a row has write number {max_seq} beyond the last one {self.last_seq}")

    def rows_after(self, seq: int, chunk: int = 4096) -> Iterator[list[Row]]:
        """Rows written after sequence number `seq`, in write order, `chunk` at a time (bounded memory)."""
        last = seq
        while True:
            raws = self._conn.execute(
                f"SELECT {_COLUMNS} FROM items WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk)
            ).fetchall()
            if not raws:
                return
            rows = [_decode_row(r, self.path) for r in raws]
            last = rows[-1].seq
            yield rows

    def upsert(
        self,
        ids: np.ndarray,
        matrix: sparse.csr_matrix,
        payload_texts: Sequence[str | None],
        thumbs: Sequence[bytes | None],
    ) -> int:
        """Store the rows in one transaction, durable on return; returns the last sequence number used."""
        rows = []
        for r, item_id in enumerate(ids.tolist()):
            lo, hi = matrix.indptr[r], matrix.indptr[r + 1]
            idx, val = matrix.indices[lo:hi].astype("<i4").tobytes(), matrix.data[lo:hi].astype("<f4").tobytes()
            rows.append((item_id, 0, idx, val, payload_texts[r], thumbs[r]))
        return self._commit(rows)

    def delete(self, ids: Sequence[int]) -> int:
        return self._commit([(int(item_id), 1, None, None, None, None) for item_id in ids])

    def _commit(self, fields: list[tuple]) -> int:
        """Number the rows (id, deleted, indices, vals, payload, thumbnail) after the last write, add their
        checksums, and commit them in one transaction; returns the last sequence number."""
        rows, seq = [], self.last_seq
        for item_id, deleted, *data in fields:
            seq += 1
            rows.append((item_id, seq, deleted, *data, row_crc(item_id, seq, deleted, *data)))
        try:
            with self._conn:  # BEGIN ... COMMIT (fsync of the WAL with synchronous=FULL), ROLLBACK on error
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    f"INSERT OR REPLACE INTO items({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(seq),))
        except sqlite3.Error as err:
            raise StoreUnavailableError(f"the write could not be stored ({err}); nothing was changed") from err
        self.last_seq = seq
        return seq

    def close(self) -> None:
        """Fold the journal into the database file (a clean start then has nothing to recover) and close."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as err:  # the data is safe in the journal either way
            log.warning("checkpoint of %s at close failed: %s", self.path, err)
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = np.frombuffer(data, ">u4" if big_endian else "<u4").astype(np.uint64)
    for a, b in zip(words[0::2].tolist(), words[1::2].tolist(), strict=True):
        s0 = (s0 + a + s1) & 0xFFFFFFFF
        s1 = (s1 + b + s0) & 0xFFFFFFFF
    return s0, s1


def check_journal(path: Path) -> None:
    """Refuse a journal (``-wal``) damaged in the middle, before SQLite reads it.

    SQLite replays journal frames up to the first one whose checksum fails and silently ignores the rest, which is
    right for a torn last write but loses committed transactions when a byte in the middle is damaged. Frames of
    the current journal generation carry the header's salts; a bad frame followed by any frame with those salts is
    therefore damage, not a torn tail (the SQLite file format, section 4: WAL checksums and salts).
    """
    wal = Path(f"{path}-wal")
    if not wal.is_file() or wal.stat().st_size < 32:
        return
    data = wal.read_bytes()
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:32])
    if magic not in (0x377F0682, 0x377F0683) or page_size < 512 or page_size & (page_size - 1):
        return  # not a journal SQLite would use either: it resets it
    big = bool(magic & 1)
    s = _wal_checksum(data[:24], 0, 0, big)
    if s != (c0, c1):
        return  # an invalid header means SQLite ignores the whole journal: only possible before any commit
    frame = 24 + page_size
    bad_at = None
    for off in range(32, len(data) - frame + 1, frame):
        head = data[off : off + 24]
        fsalt1, fsalt2, f0, f1 = struct.unpack(">4I", head[8:24])
        if (fsalt1, fsalt2) != (salt1, salt2):
            if bad_at is None:
                return  # an older generation's frames: the valid journal ends here
            continue
        if bad_at is not None:
            raise CorruptStoreError(
                wal,
                f"journal frame at byte {bad_at} fails its checksum but later frames of the same journal follow: "
                "committed writes after it would be silently dropped",
            )
        s = _wal_checksum(head[:8] + data[off + 24 : off + frame], s[0], s[1], big)
        if s != (f0, f1):
            bad_at = off


def acquire_lock(path: Path) -> int:
    """One server per database: an exclusive flock on ``serve.sqlite3.lock``, released by close or by the kernel
    when the process dies (so a SIGKILLed server never leaves a stale lock). Two processes applying writes to
    their own in-memory indexes from one database would diverge."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"{path} is in use by another server process (it holds {path}.lock); one server per index directory"
        ) from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), WAL journal, fsync on every commit."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.DatabaseError(f"cannot switch {path} to WAL journal mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    return conn
