"""Append-only write-ahead log: what the server acknowledged survives a restart or a kill.

Saving the whole index on every write is O(N) per request; appending one record and fsyncing it is O(record).
Each record carries a sequence number and a CRC32 over (sequence, body), so on start-up a record torn by a kill
in the middle of a write is recognised and dropped. Such a record was never acknowledged: the reply is sent only
after fsync returned.

Record layout (little-endian): magic b"LPW1" | u32 body length | u64 sequence | u32 crc32 | body.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

from models.atomic_io import fsync_path

log = logging.getLogger("lpjepa.serve")

MAGIC = b"LPW1"
HEADER = struct.Struct("<4sIQI")
MAX_RECORD = 1 << 30


def _crc(seq: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(struct.pack("<Q", seq))) & 0xFFFFFFFF


def encode_record(seq: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body), seq, _crc(seq, body)) + body


class WriteAheadLog:
    """One log file; `open` scans it, drops a torn tail, and returns the intact records for replay."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh = None
        self.last_seq = 0
        self.records = 0  # records currently in the file
        self.dropped_bytes = 0  # torn/corrupt tail removed at open

    def open(self, min_seq: int = 0) -> list[tuple[int, bytes]]:
        """Read every intact record, truncate anything after the first bad one, and get ready to append.

        `min_seq` is the sequence number the last snapshot covers: new records continue after it, so a log that
        was reset after a snapshot never reuses a number.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        records: list[tuple[int, bytes]] = []
        offset = 0
        last = min_seq
        previous: int | None = None
        while offset < len(data):
            reason = None
            if len(data) - offset < HEADER.size:
                reason = "a partial header"
            else:
                magic, length, seq, crc = HEADER.unpack_from(data, offset)
                end = offset + HEADER.size + length
                if magic != MAGIC or length > MAX_RECORD:
                    reason = "a bad record header"
                elif end > len(data):
                    reason = "a partial record"
                else:
                    body = data[offset + HEADER.size : end]
                    if _crc(seq, body) != crc:
                        reason = "a checksum mismatch"
                    elif previous is not None and seq <= previous:
                        reason = f"an out-of-order sequence number {seq} after {previous}"
            if reason is not None:
                self.dropped_bytes = len(data) - offset
                log.warning(
                    "write-ahead log %s: dropping %d bytes at offset %d (%s); they were never acknowledged",
                    self.path,
                    self.dropped_bytes,
                    offset,
                    reason,
                )
                with open(self.path, "r+b") as fh:
                    fh.truncate(offset)
                    fh.flush()
                    os.fsync(fh.fileno())
                break
            records.append((seq, body))
            previous = seq
            last = max(last, seq)
            offset = end
        self.last_seq = last
        self.records = len(records)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - held open for the server's lifetime
        os.fsync(self._fh.fileno())
        fsync_path(self.path.parent)
        return records

    def append(self, body: bytes) -> int:
        """Write one record and fsync it; only then may the caller acknowledge the write. Returns its sequence."""
        if self._fh is None:
            raise RuntimeError("WriteAheadLog.open() was not called")
        seq = self.last_seq + 1
        self._fh.write(encode_record(seq, body))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.last_seq = seq
        self.records += 1
        return seq

    def reset(self) -> None:
        """Empty the log after a snapshot made its records redundant (sequence numbers keep counting)."""
        if self._fh is None:
            raise RuntimeError("WriteAheadLog.open() was not called")
        self._fh.truncate(0)
        self._fh.seek(0)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
