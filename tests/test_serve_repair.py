"""Defect 5 of issue 14, the recovery side: the server refuses damaged state (test_serve_durability.py), the CLI says
so and names the way out, and `lpjepa index repair` keeps every intact row and reports exactly what it could not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import abandon_store, filled_store, legacy_dir, run_cli, sparse_rows, store_state

from serve.durable_log import DB_NAME, CorruptStoreError
from serve.repair import repair
from serve.store import ItemStore


def _refused_flips(tmp_path, pristine: bytes, count: int) -> list[int]:
    """Byte positions whose flip the start-up check refuses (spread over the file)."""
    path = tmp_path / "idx" / DB_NAME
    found = []
    for pos in np.linspace(100, len(pristine) - 1, 80).astype(int):
        data = bytearray(pristine)
        data[pos] ^= 0x5A
        path.write_bytes(bytes(data))
        try:
            ItemStore.open(tmp_path / "idx", dim=16).db.close()
        except CorruptStoreError:
            found.append(int(pos))
    path.write_bytes(pristine)
    step = max(1, len(found) // count)
    return found[::step][:count]


def test_repair_keeps_every_intact_row_and_reports_the_rest(tmp_path):
    expected, pristine = filled_store(tmp_path)
    path = tmp_path / "idx" / DB_NAME
    positions = _refused_flips(tmp_path, pristine, 6)
    assert len(positions) >= 4
    for pos in positions:
        for stale in tmp_path.joinpath("idx").glob(f"{DB_NAME}.damaged-*"):
            stale.unlink()
        data = bytearray(pristine)
        data[pos] ^= 0x5A
        path.write_bytes(bytes(data))
        report = repair(tmp_path / "idx")
        assert (
            report.kind == "database"
            and report.damaged_copy
            and (tmp_path / "idx").joinpath(report.damaged_copy).exists()
        )
        store = ItemStore.open(tmp_path / "idx", dim=16)  # starts again
        state = store_state(store)
        missing = set(expected) - set(state)
        for item_id, value in state.items():
            assert value == expected[item_id], f"flip at {pos}: item {item_id} changed"
        if report.unreadable_regions == 0:
            assert missing <= set(report.rows_bad_checksum), (pos, missing, report)
        assert report.rows_kept == len(state), (pos, report)
        assert report.lost_after_snapshot >= len(missing) or report.unreadable_regions, (pos, report)
        store.db.close()
        path.write_bytes(pristine)


def test_repair_after_a_snapshot_loses_nothing_the_snapshot_holds(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16)
    store.upsert(np.arange(20), sparse_rows(20), [{"i": i} for i in range(20)], [None] * 20)
    store.close()  # the snapshot includes all 20 writes
    check = ItemStore.open(tmp_path / "idx", dim=16)
    expected = store_state(check)
    check.db.close()
    (tmp_path / "idx" / DB_NAME).write_bytes(b"\x00" * 8192)  # the database is gone entirely
    with pytest.raises(CorruptStoreError):
        ItemStore.open(tmp_path / "idx", dim=16)
    report = repair(tmp_path / "idx")
    assert report.rows_kept == 0 and report.last_seq == 20 and report.lost_after_snapshot == 0
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert store_state(reopened) == expected
    reopened.upsert(np.array([99]), sparse_rows(1), [None], [None])  # and it takes writes again, numbered after 20
    assert reopened.db.last_seq == 21


def test_repair_salvages_an_old_log_the_migration_refused(tmp_path):
    directory, records = legacy_dir(tmp_path)
    data = bytearray((directory / "serve-wal.log").read_bytes())
    data[len(records[0]) + 30] ^= 0xFF  # damage in record 2 of 3
    (directory / "serve-wal.log").write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError):
        ItemStore.open(directory, dim=16)
    report = repair(directory)
    assert report.kind == "legacy-log"
    store = ItemStore.open(directory, dim=16)
    assert sorted(store.index.ids().tolist()) == [1, 2, 100, 101]  # record 1 kept; records 2-3 given up
    assert store.index.payload(1) == {"n": 1}
    abandon_store(store)


@pytest.mark.slow
def test_serve_refuses_damaged_state_and_repair_lets_it_start(model_path, tmp_path):
    idx64 = tmp_path / "idx64"
    store = ItemStore.open(idx64, dim=64, compact_every=10**6)
    store.upsert(np.arange(30), sparse_rows(30, dim=64), [{"i": i} for i in range(30)], [None] * 30)
    store.db.close()
    raw = bytearray((idx64 / DB_NAME).read_bytes())
    raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)  # the second half zeroed
    (idx64 / DB_NAME).write_bytes(bytes(raw))
    refused = run_cli("serve", "--model", str(model_path), "--index", str(idx64), "--port", "0")
    assert refused.returncode == 2, refused.stderr
    assert str(idx64 / DB_NAME) in refused.stderr and "lpjepa index repair" in refused.stderr
    repaired = run_cli("index", "repair", str(idx64))
    assert repaired.returncode == 0, repaired.stderr
    report = json.loads(repaired.stdout)
    assert report["kind"] == "database" and report["damaged_copy"]
    reopened = ItemStore.open(idx64, dim=64)
    assert len(reopened) == report["rows_kept"] and reopened.db.last_seq == 30
