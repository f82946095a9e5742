"""Durability of the served index: the write-ahead log (torn tails, checksums, sequence numbers), its record codec,
and the store's recovery after a kill (replay, idempotent replay over a newer snapshot, refusal before logging)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scipy import sparse

from serve.store import decode_record, encode_delete, encode_upsert
from serve.wal import HEADER, WriteAheadLog, encode_record


def _bodies(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.bytes(int(rng.integers(1, 200))) for _ in range(n)]


def test_records_survive_reopen_in_order(tmp_path):
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    assert wal.open() == []
    bodies = _bodies(20)
    seqs = [wal.append(b) for b in bodies]
    wal.close()
    assert seqs == list(range(1, 21))
    again = WriteAheadLog(path)
    records = again.open()
    assert [s for s, _ in records] == seqs
    assert [b for _, b in records] == bodies
    assert again.last_seq == 20 and again.records == 20 and again.dropped_bytes == 0
    again.close()


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 3])
def test_torn_last_record_is_dropped_and_truncated(tmp_path, cut):
    """A kill in the middle of a write leaves a prefix of the last record; it was never acknowledged."""
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.open()
    bodies = _bodies(5)
    for b in bodies:
        wal.append(b)
    wal.close()
    intact = path.stat().st_size
    torn = encode_record(6, b"x" * 50)[:cut]
    with open(path, "ab") as fh:
        fh.write(torn)
    again = WriteAheadLog(path)
    records = again.open()
    assert [b for _, b in records] == bodies
    assert again.dropped_bytes == cut
    assert path.stat().st_size == intact  # the torn bytes are gone, so new records do not follow garbage
    assert again.append(b"next") == 6
    again.close()
    final = WriteAheadLog(path)
    assert [b for _, b in final.open()] == [*bodies, b"next"]
    final.close()


def test_checksum_mismatch_stops_replay(tmp_path):
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.open()
    for b in _bodies(4):
        wal.append(b)
    wal.close()
    data = bytearray(path.read_bytes())
    # Flip one byte in the body of the third record.
    offset = 0
    for _ in range(2):
        (length,) = struct.unpack_from("<I", data, offset + 4)
        offset += HEADER.size + length
    data[offset + HEADER.size] ^= 0xFF
    path.write_bytes(bytes(data))
    again = WriteAheadLog(path)
    records = again.open()
    assert [s for s, _ in records] == [1, 2]
    assert path.stat().st_size == offset
    again.close()


def test_reset_keeps_counting_sequence_numbers(tmp_path):
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.open()
    wal.append(b"a")
    wal.append(b"b")
    wal.reset()
    assert path.stat().st_size == 0 and wal.records == 0
    assert wal.append(b"c") == 3
    wal.close()
    again = WriteAheadLog(path)
    assert again.open(min_seq=2) == [(3, b"c")]
    assert again.append(b"d") == 4
    again.close()


def test_records_older_than_the_snapshot_are_kept_in_order(tmp_path):
    """A kill after the snapshot committed but before the log reset leaves records the snapshot already holds;
    reopening must keep them (the store skips them by sequence number) and every record appended after."""
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.open()
    for b in (b"a", b"b", b"c"):
        wal.append(b)
    wal.close()
    again = WriteAheadLog(path)
    assert [s for s, _ in again.open(min_seq=3)] == [1, 2, 3]
    assert again.append(b"d") == 4
    again.close()
    final = WriteAheadLog(path)
    assert final.open(min_seq=3) == [(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d")]
    final.close()


def test_append_before_open_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="open"):
        WriteAheadLog(tmp_path / "w").append(b"x")


def test_upsert_record_round_trip_is_exact():
    rng = np.random.default_rng(1)
    dense = rng.random((7, 33)).astype(np.float32)
    dense[dense < 0.8] = 0
    dense[3] = 0  # an all-zero code is legal
    matrix = sparse.csr_matrix(dense)
    ids = np.array([5, 2**62, 0, 9, 10, 11, 12], dtype=np.int64)
    payloads = [{"label": i, "name": f"item {i}", "nested": {"x": [1, 2.5]}} if i % 2 else None for i in range(7)]
    thumbs = [bytes([i]) * (i + 1) if i % 3 else None for i in range(7)]
    record = decode_record(encode_upsert(ids, matrix, payloads, thumbs))
    assert record["op"] == "upsert"
    np.testing.assert_array_equal(record["ids"], ids)
    np.testing.assert_array_equal(record["matrix"].toarray(), dense)  # float32 bit-exact
    assert record["payloads"] == payloads
    assert record["thumbs"] == thumbs


def test_delete_record_round_trip():
    record = decode_record(encode_delete(np.array([3, 2**63 - 1], dtype=np.int64)))
    assert record["op"] == "delete"
    assert record["ids"].tolist() == [3, 2**63 - 1]


# ------------------------------------------------------------------------------------------ store recovery
def _rows(n: int, dim: int = 16, seed: int = 0) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, dim)).astype(np.float32)
    dense[dense < 0.6] = 0
    return sparse.csr_matrix(dense)


def _state(store) -> dict:
    ids = store.index.ids().tolist()
    return {i: (store.index.payload(i), store.index.reconstruct([i]).toarray().round(6).tolist()) for i in ids}


def test_store_replays_the_log_after_a_kill(tmp_path):
    from serve.store import ItemStore

    store = ItemStore.open(tmp_path / "idx", dim=16, compact_every=1000)
    store.upsert(np.array([1, 2, 3]), _rows(3), [{"n": 1}, {"n": 2}, None], [b"t1", None, None])
    store.upsert(np.array([2]), _rows(1, seed=5), [{"n": "two"}], [None])  # replace
    assert store.delete(1) is True and store.delete(1) is False
    expected = _state(store)
    store.wal.close()  # "kill": no snapshot, only the log holds these writes
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert reopened.replayed == 3
    assert _state(reopened) == expected and reopened.thumbs == {}
    reopened.close()
    assert (tmp_path / "idx" / "serve-wal.log").stat().st_size == 0
    assert _state(ItemStore.open(tmp_path / "idx", dim=16)) == expected


def test_store_replay_is_idempotent_over_a_newer_snapshot(tmp_path):
    """Kill after the index snapshot committed but before the server state and log caught up: the log's records
    are applied a second time over a snapshot that already holds them, and the result is the same."""
    from serve.store import ItemStore

    store = ItemStore.open(tmp_path / "idx", dim=16)
    store.upsert(np.arange(10, 20), _rows(10), [{"i": i} for i in range(10)], [None] * 10)
    store.delete(12)
    store.upsert(np.array([13]), _rows(1, seed=9), [{"i": "new"}], [b"png"])
    expected = _state(store)
    store.index.save(tmp_path / "idx")  # the snapshot commits ...
    store.wal.close()  # ... and the process dies before writing serve-state.json and emptying the log
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert reopened.replayed == 3 and _state(reopened) == expected and reopened.thumbs == {13: b"png"}


def test_store_drops_a_torn_tail_and_keeps_acknowledged_writes(tmp_path):
    from serve.store import ItemStore, encode_upsert

    store = ItemStore.open(tmp_path / "idx", dim=16)
    for i in range(5):
        store.upsert(np.array([i]), _rows(1, seed=i), [{"i": i}], [None])
    expected = _state(store)
    store.wal.close()
    torn = encode_record(99, encode_upsert(np.array([77]), _rows(1), [{"i": 77}], [None]))
    with open(tmp_path / "idx" / "serve-wal.log", "ab") as fh:
        fh.write(torn[: len(torn) - 5])  # the write of id 77 was cut by the kill: never acknowledged
    reopened = ItemStore.open(tmp_path / "idx", dim=16)
    assert _state(reopened) == expected and 77 not in reopened
    assert reopened.wal.dropped_bytes == len(torn) - 5


def test_store_refuses_what_the_index_would_refuse_before_logging(tmp_path):
    from serve.store import ItemStore, StoreError

    store = ItemStore.open(tmp_path / "idx", dim=16)
    bad = _rows(1).toarray()
    bad[0, 3] = -1.0
    with pytest.raises(StoreError, match="negative"):
        store.upsert(np.array([1]), sparse.csr_matrix(bad), [None], [None])
    with pytest.raises(StoreError, match="dimension"):
        store.upsert(np.array([1]), _rows(1, dim=17), [None], [None])
    with pytest.raises(StoreError, match="duplicates"):
        store.upsert(np.array([1, 1]), _rows(2), [None, None], [None, None])
    assert store.wal.records == 0 and len(store) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        ItemStore.open(tmp_path / "other", dim=16)
    with pytest.raises(StoreError):
        ItemStore.open(tmp_path / "idx", dim=32)
