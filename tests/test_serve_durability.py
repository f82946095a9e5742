"""Durability of the served index: the SQLite database (rows, checksums, sequence numbers), the store's recovery
after a kill (replay, idempotent replay over a newer snapshot, refusal before storing), corruption detection at
start-up (never a silent loss of rows) and the one-time migration of the old serve-wal.log."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from helpers import (
    abandon_store,
    filled_store,
    legacy_dir,
    legacy_record,
    legacy_upsert,
    sparse_rows,
    store_state,
    thumb_png,
)
from scipy import sparse

from serve.durable_log import DB_NAME, CorruptStoreError, ItemLog, encode_payload
from serve.repair import repair
from serve.store import SEQ_KEY, ItemStore, StoreError


# ------------------------------------------------------------------------------------------ the database
def test_rows_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    dense = rng.random((7, 33)).astype(np.float32)
    dense[dense < 0.8] = 0
    dense[3] = 0  # an all-zero code is legal in the store
    matrix = sparse.csr_matrix(dense)
    ids = np.array([5, 2**62, 0, 9, 10, 11, 12], dtype=np.int64)
    payloads = [{"label": i, "name": f"item {i} é", "nested": {"x": [1, 2.5]}} if i % 2 else None for i in range(7)]
    thumbs = [thumb_png(bytes([i]) * (i + 1)) if i % 3 else None for i in range(7)]
    db = ItemLog.open(tmp_path / DB_NAME, dim=33)
    assert db.upsert(ids, matrix, [encode_payload(p) for p in payloads], thumbs) == 7
    assert db.delete([9]) == 8
    db.close()
    again = ItemLog.open(tmp_path / DB_NAME, dim=33)
    rows = {r.id: r for chunk in again.rows_after(0, chunk=3) for r in chunk}
    assert sorted(rows) == sorted(ids.tolist())
    for r, item_id in enumerate(ids.tolist()):
        row = rows[item_id]
        if item_id == 9:
            assert row.deleted and row.seq == 8 and row.indices is None
            continue
        got = np.zeros(33, np.float32)
        got[row.indices] = row.values
        np.testing.assert_array_equal(got, dense[r])  # float32 bit-exact
        assert row.payload == payloads[r] and row.thumbnail == thumbs[r]
    assert [r.id for chunk in again.rows_after(5) for r in chunk] == [11, 12, 9]  # write order after seq 5
    again.close()


def test_database_settings_are_durable(tmp_path):
    db = ItemLog.open(tmp_path / DB_NAME, dim=4)
    assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # noqa: SLF001
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # noqa: SLF001 - FULL
    db.close()
    with pytest.raises(StoreError, match="4-dimensional"):
        ItemLog.open(tmp_path / DB_NAME, dim=8)


def test_a_lone_surrogate_never_reaches_the_database():
    with pytest.raises(UnicodeEncodeError):
        encode_payload({"name": "\ud800"})
    with pytest.raises(ValueError):
        encode_payload({"x": float("nan")})


# ------------------------------------------------------------------------------------------ store recovery
def test_store_replays_the_database_after_a_kill(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16, compact_every=1000)
    store.upsert(
        np.array([1, 2, 3]), sparse_rows(3), [{"n": 1}, {"n": 2}, None], [thumb_png(b"t1"), None, thumb_png(b"t3")]
    )
    store.upsert(np.array([2]), sparse_rows(1, seed=5), [{"n": "two"}], [None])  # replace
    assert store.delete(1) is True and store.delete(1) is False
    expected = store_state(store)
    abandon_store(store)
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert reopened.replayed == 3  # one row per id: 1 (tombstone), 2 (replaced), 3
    assert store_state(reopened) == expected and reopened.get(3).thumbnail == thumb_png(b"t3")
    reopened.close()
    third = ItemStore.open(tmp_path / "idx", dim=16)
    assert third.replayed == 0 and third.snapshot_seq == 5  # the clean close saved a snapshot including write 5
    assert store_state(third) == expected


def test_store_replay_is_idempotent_over_a_newer_snapshot(tmp_path):
    """Rows a snapshot already holds are applied a second time over it, and the result is the same."""
    store = ItemStore.open(tmp_path / "idx", dim=16)
    store.upsert(np.arange(10, 20), sparse_rows(10), [{"i": i} for i in range(10)], [None] * 10)
    store.delete(12)
    store.upsert(np.array([13]), sparse_rows(1, seed=9), [{"i": "new"}], [thumb_png(b"png")])
    expected = store_state(store)
    store.index.save(tmp_path / "idx")  # a snapshot that does not record which writes it includes
    abandon_store(store)
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert (
        reopened.replayed == 10
        and store_state(reopened) == expected
        and reopened.get(13).thumbnail == thumb_png(b"png")
    )


def test_compaction_snapshots_record_their_sequence_number(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16, compact_every=4)
    for i in range(10):
        store.upsert(np.array([i]), sparse_rows(1, seed=i), [{"i": i}], [thumb_png(bytes([i]))])
    assert store.snapshots == 2 and store.snapshot_seq == 8 and store.pending == 2
    expected = store_state(store)
    abandon_store(store)
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert reopened.index.metadata[SEQ_KEY] == 8 and reopened.replayed == 2
    assert store_state(reopened) == expected  # thumbnails of items in the snapshot come from the database


def test_store_refuses_what_the_index_would_refuse_before_storing(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16)
    bad = sparse_rows(1).toarray()
    bad[0, 3] = -1.0
    with pytest.raises(StoreError, match="negative"):
        store.upsert(np.array([1]), sparse.csr_matrix(bad), [None], [None])
    with pytest.raises(StoreError, match="dimension"):
        store.upsert(np.array([1]), sparse_rows(1, dim=17), [None], [None])
    with pytest.raises(StoreError, match="duplicates"):
        store.upsert(np.array([1, 1]), sparse_rows(2), [None, None], [None, None])
    with pytest.raises(StoreError, match="surrogate"):
        store.upsert(np.array([1]), sparse_rows(1), [{"s": "\udfff"}], [None])
    assert store.db.last_seq == 0 and len(store) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        ItemStore.open(tmp_path / "other", dim=16)
    with pytest.raises(StoreError):
        ItemStore.open(tmp_path / "idx", dim=32)


# ------------------------------------------------------------------------------------------ corruption
def test_flipped_bytes_anywhere_are_refused_or_harmless(tmp_path):
    """Defect 5: after a flip the server must refuse to start (naming the file and the recovery) or hold exactly
    what was acknowledged; starting with rows missing is the one outcome that must never happen."""
    expected, pristine = filled_store(tmp_path)
    path = tmp_path / "idx" / DB_NAME
    refused = 0
    positions = np.linspace(100, len(pristine) - 1, 60).astype(int)
    for pos in positions:
        data = bytearray(pristine)
        data[pos] ^= 0x5A
        path.write_bytes(bytes(data))
        try:
            store = ItemStore.open(tmp_path / "idx", dim=16)
        except CorruptStoreError as err:
            assert str(path) in str(err) and "lpjepa index repair" in str(err)
            refused += 1
            continue
        assert store_state(store) == expected, f"silent change after flipping byte {pos}"
        store.db.close()
    assert refused >= len(positions) // 3  # many bytes are unused page space; the rest must be caught


def test_a_database_older_than_the_snapshot_is_refused(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16)
    store.upsert(np.array([1]), sparse_rows(1), [None], [None])
    store.close()  # snapshot includes write 1
    (tmp_path / "idx" / DB_NAME).unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        ItemStore.open(tmp_path / "idx", dim=16)


def test_not_a_database_is_refused(tmp_path):
    ItemStore.open(tmp_path / "idx", dim=16).close()
    (tmp_path / "idx" / DB_NAME).write_bytes(b"garbage" * 100)
    with pytest.raises(CorruptStoreError, match="not a readable SQLite database"):
        ItemStore.open(tmp_path / "idx", dim=16)


def test_a_row_edited_behind_the_servers_back_fails_its_checksum(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16)
    store.upsert(np.array([1, 2]), sparse_rows(2), [{"a": 1}, {"a": 2}], [None, None])
    store.db.close()
    with sqlite3.connect(tmp_path / "idx" / DB_NAME) as conn:
        conn.execute("""UPDATE items SET payload = '{"a":3}' WHERE id = 2""")
    with pytest.raises(CorruptStoreError, match="item 2"):
        ItemStore.open(tmp_path / "idx", dim=16)


# ------------------------------------------------------------------------------------------ migration
def test_an_old_log_is_migrated_once(tmp_path, caplog):
    directory, _ = legacy_dir(tmp_path)
    with caplog.at_level("WARNING", logger="lpjepa.serve"):
        store = ItemStore.open(directory, dim=16)
    assert "migrated 3 old log records" in caplog.text
    assert sorted(store.index.ids().tolist()) == [1, 2, 100]
    assert store.index.payload(1) == {"n": 1} and store.index.payload(2) == {"n": 2}
    assert [store.get(i).thumbnail for i in (1, 2, 100)] == [thumb_png(b"t1"), thumb_png(b"t2"), thumb_png(b"old")]
    np.testing.assert_allclose(store.index.reconstruct([2]).toarray(), sparse_rows(1, seed=7).toarray(), rtol=1e-6)
    expected = store_state(store)
    assert (directory / "serve-wal.log.migrated").exists() and not (directory / "serve-wal.log").exists()
    abandon_store(store)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lpjepa.serve"):
        again = ItemStore.open(directory, dim=16)
    assert "migrat" not in caplog.text and store_state(again) == expected


def test_an_old_log_damaged_in_the_middle_is_not_migrated(tmp_path):
    """The old reader truncated at the first bad record and lost every later acknowledged write."""
    directory, records = legacy_dir(tmp_path)
    data = bytearray((directory / "serve-wal.log").read_bytes())
    data[len(records[0]) + 30] ^= 0xFF  # inside record 2; record 3 follows intact
    (directory / "serve-wal.log").write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="serve-wal.log.*checksum mismatch.*lpjepa index repair"):
        ItemStore.open(directory, dim=16)
    assert not (directory / DB_NAME).exists() and (directory / "serve-wal.log").exists()


def test_an_old_log_with_a_torn_tail_migrates_the_acknowledged_records(tmp_path):
    directory, records = legacy_dir(tmp_path)
    torn = legacy_record(4, legacy_upsert([77], sparse_rows(1), [None], [None]))
    with open(directory / "serve-wal.log", "ab") as fh:
        fh.write(torn[:-5])
    store = ItemStore.open(directory, dim=16)
    assert sorted(store.index.ids().tolist()) == [1, 2, 100]


def test_damage_in_the_middle_of_the_journal_is_refused(tmp_path):
    """SQLite stops replaying its journal at the first bad frame and drops the committed frames after it."""
    import shutil

    store = ItemStore.open(tmp_path / "idx", dim=16, compact_every=10**6)
    for i in range(40):
        store.upsert(np.array([i]), sparse_rows(1, seed=i), [{"i": i}], [None])
    expected = store_state(store)
    shutil.copytree(tmp_path / "idx", tmp_path / "killed")  # the files as SIGKILL leaves them: journal not folded
    journal = tmp_path / "killed" / f"{DB_NAME}-wal"
    assert journal.stat().st_size > 20 * 4096
    pristine = journal.read_bytes()
    reopened = ItemStore.open(tmp_path / "killed", dim=16)  # intact: every write is recovered from the journal
    assert store_state(reopened) == expected
    abandon_store(reopened)
    shutil.rmtree(tmp_path / "killed")
    shutil.copytree(tmp_path / "idx", tmp_path / "killed")
    data = bytearray(pristine)
    data[len(data) // 3] ^= 0x01  # inside a frame of an early transaction
    journal.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"serve.sqlite3-wal.*journal frame.*lpjepa index repair"):
        ItemStore.open(tmp_path / "killed", dim=16)
    report = repair(tmp_path / "killed")
    survivors = store_state(ItemStore.open(tmp_path / "killed", dim=16))
    assert report.rows_kept == len(survivors) and all(survivors[i] == expected[i] for i in survivors)
    store.db.close()


def test_one_server_per_database(tmp_path):
    store = ItemStore.open(tmp_path / "idx", dim=16)
    with pytest.raises(StoreError, match="in use by another server") as err:
        ItemStore.open(tmp_path / "idx", dim=16)
    assert err.value.code == "store_locked"
    with pytest.raises(StoreError, match="in use"):
        repair(tmp_path / "idx")
    store.close()
    ItemStore.open(tmp_path / "idx", dim=16).close()  # released by close
