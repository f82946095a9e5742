"""`lpjepa index repair DIR`: recover a server database the start-up check refused, keeping every intact row.

The server never starts on damaged state (serve/durable_log.py), so losing rows is always an operator's explicit
decision, made here with a report of exactly what is kept and what is not:

1. Every row that can still be read and passes its CRC is copied, with its original sequence number, into a new
   database (``serve.sqlite3.repairing``, then renamed into place). Rows are read in id order in small pages;
   a page SQLite cannot read is retried row by row, and a region it cannot read at all is skipped with
   exponentially growing steps, so one broken B-tree page does not cost the rows after it.
2. The damaged file (and its journal) is kept beside it as ``serve.sqlite3.damaged-<UTC time>``.
3. ``last_seq`` becomes the larger of the snapshot's ``serve_seq`` and the highest surviving row, so the server's
   consistency check passes; rows lost from *before* the snapshot are still in the snapshot, rows lost from after
   it are gone, and the report counts both.

An old ``serve-wal.log`` that the strict migration refused is salvaged instead: its records before the first
damaged one are migrated, and the number of bytes given up is reported.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic_io import fsync_path
from serve.durable_log import _COLUMNS, _SCHEMA, DB_FORMAT, DB_NAME, CorruptStoreError, _decode_row, acquire_lock

log = logging.getLogger("lpjepa.serve")

PAGE = 256
MAX_SKIPS = 4096


@dataclass
class RepairReport:
    directory: str
    kind: str  # "database" | "legacy-log" | "nothing-to-do"
    rows_kept: int = 0
    rows_bad_checksum: list[int] = field(default_factory=list)
    unreadable_regions: int = 0
    snapshot_seq: int = 0
    last_seq: int = 0
    lost_after_snapshot: int = 0  # damaged rows whose write came after the snapshot: those writes are gone
    damaged_copy: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_rows(path: Path, report: RepairReport) -> tuple[list[tuple], dict[str, str]]:
    """Every readable raw row with a valid CRC, in id order; bad ones are recorded in the report."""
    conn = sqlite3.connect(path)
    meta: dict[str, str] = {}
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as err:
        report.notes.append(f"meta table unreadable ({err}); dimension and counters rebuilt")
    good: list[tuple] = []
    last = -(2**63)
    step = 1
    skips = 0

    def keep(raws: list[tuple]) -> None:
        for raw in raws:
            try:
                _decode_row(raw, path)
            except (CorruptStoreError, TypeError, ValueError):
                report.rows_bad_checksum.append(int(raw[0]) if isinstance(raw[0], int) else -1)
                if not isinstance(raw[1], int) or raw[1] > report.snapshot_seq:
                    report.lost_after_snapshot += 1  # (a damaged sequence number counts as lost, to be safe)
                continue
            good.append(raw)

    query = f"SELECT {_COLUMNS} FROM items WHERE id > ? ORDER BY id LIMIT ?"
    while skips < MAX_SKIPS:
        try:
            raws = conn.execute(query, (last, PAGE)).fetchall()
        except sqlite3.DatabaseError:
            try:  # the page is unreadable somewhere: one row at a time
                raws = conn.execute(query, (last, 1)).fetchall()
            except sqlite3.DatabaseError:
                report.unreadable_regions += 1
                skips += 1
                if last >= 2**63 - 1 - step:
                    break
                last += step
                step *= 2
                continue
        if not raws:
            break
        step = 1
        keep(raws)
        last = int(raws[-1][0])
    conn.close()
    return good, meta


def repair(directory: str | os.PathLike[str]) -> RepairReport:
    """Rebuild ``DIR/serve.sqlite3`` from its intact rows (or salvage an old log); never deletes the damaged file."""
    from index.store import read_manifest
    from serve.migrate import LEGACY_WAL, migrate_legacy
    from serve.store import SEQ_KEY

    directory = Path(directory)
    manifest = read_manifest(directory)  # the snapshot must be loadable; otherwise only a restore helps
    dim = int(manifest["dim"])
    snapshot_seq = int((manifest.get("metadata") or {}).get(SEQ_KEY, 0))
    db_path = directory / DB_NAME
    report = RepairReport(str(directory), "nothing-to-do", snapshot_seq=snapshot_seq)

    if not db_path.exists() and (directory / LEGACY_WAL).exists():
        from index.factory import load_index

        report.kind = "legacy-log"
        index = load_index(directory, expected_dim=dim)
        migrate_legacy(directory, index, dim=dim, salvage=True)
        report.notes.append("old serve-wal.log salvaged up to its first damaged record (see the log for bytes dropped)")
        return report
    if not db_path.exists():
        report.notes.append(f"no {DB_NAME}: the snapshot alone is the state; the server creates a new database")
        return report

    report.kind = "database"
    lock_fd = acquire_lock(db_path)  # refuses while a server holds the database
    try:
        _rebuild(directory, db_path, dim, report)
    finally:
        os.close(lock_fd)
    return report


def _rebuild(directory: Path, db_path: Path, dim: int, report: RepairReport) -> None:
    snapshot_seq = report.snapshot_seq
    rows, meta = _read_rows(db_path, report)
    try:
        stored_last = int(meta.get("last_seq", 0))
    except ValueError:
        stored_last = 0
    top = max((int(r[1]) for r in rows), default=0)
    report.rows_kept = len(rows)
    report.last_seq = max(snapshot_seq, top, stored_last)
    if stored_last > max(top, snapshot_seq):
        report.notes.append(
            f"writes {max(top, snapshot_seq) + 1}..{stored_last} were acknowledged but no intact row holds them"
        )

    tmp = directory / f"{DB_NAME}.repairing"
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename; the server switches it to WAL
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
    conn.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?)",
        [("format", DB_FORMAT), ("dim", str(dim)), ("last_seq", str(report.last_seq))],
    )
    conn.executemany(f"INSERT INTO items({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()
    fsync_path(tmp)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")  # noqa: UP017 - py3.10
    damaged = directory / f"{DB_NAME}.damaged-{stamp}"
    os.replace(db_path, damaged)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{db_path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{damaged}{suffix}"))
    os.replace(tmp, db_path)
    fsync_path(directory)
    report.damaged_copy = str(damaged)
    log.warning(
        "%s: repaired %s: %d rows kept, %d failed their checksum, %d unreadable regions; damaged file kept as %s",
        directory,
        DB_NAME,
        report.rows_kept,
        len(report.rows_bad_checksum),
        report.unreadable_regions,
        damaged.name,
    )
