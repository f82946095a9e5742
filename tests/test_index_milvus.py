"""What only the Milvus backend has: a shared collection, its metadata, embedded files, failures of the server.

The generic contract (exact search, add/replace/remove, payloads, validation) runs against Milvus in
test_index_exact.py and test_index_mutation.py; here everything talks to a real Milvus too (the session's local
server from conftest.py, or an embedded Milvus Lite file), never a mock.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from helpers import png_bytes
from PIL import Image
from test_index_support import assert_exact_topk, brute_force, random_csr

from index import BackendUnavailableError, IndexMismatchError, InvalidInputError, create_index, milvus_index
from index.milvus_index import MAX_TOPK, open_milvus_index
from index.milvus_server import LocalMilvus, free_port

D = 32


def test_two_clients_share_one_collection_and_see_each_others_writes(milvus_server, milvus_collection):
    """Two indexes on one uri + collection stand for two processes: Strong consistency gives read-your-writes."""
    a = create_index("milvus", D, "cosine", uri=milvus_server.uri, collection=milvus_collection)
    b = create_index("milvus", D, "cosine", uri=milvus_server.uri, collection=milvus_collection)
    x = random_csr(60, D, 0.3, seed=1)
    a.add(np.arange(60), x, [{"n": i} for i in range(60)])
    assert len(b) == 60 and b.payloads([7, 8]) == [{"n": 7}, {"n": 8}]  # b created no collection: it adopts a's
    scores, ids = b.search(x[:5], 3)
    assert_exact_topk(scores, ids, brute_force(x.toarray(), x[:5].toarray(), "cosine"), np.arange(60), 3)
    b.remove([0, 1])
    assert not a.contains([0, 1]).any() and len(a) == 58
    b.add([5], np.ones((1, D)), [{"replaced": True}])
    assert a.payload(5) == {"replaced": True}
    np.testing.assert_allclose(a.reconstruct([5]).toarray(), np.ones((1, D)), rtol=1e-6)


def test_model_metadata_and_mismatches_are_kept_in_the_collection(milvus_server, milvus_collection):
    uri = milvus_server.uri
    index = create_index("milvus", D, "cosine", uri=uri, collection=milvus_collection, index="wand")
    index.metadata = {"model": {"sha256": "ab" * 32, "dim": D}, "data": "fashion-mnist"}
    index.add([1], np.ones((1, D)))  # the collection is created at the first write, metadata included
    again = open_milvus_index(uri, milvus_collection, expected_dim=D)
    assert again.metadata == index.metadata and again.metric == "cosine" and again.index_kind == "wand"
    assert len(again) == 1
    with pytest.raises(IndexMismatchError, match=f"dimension {D} but the model produces 16"):
        open_milvus_index(uri, milvus_collection, expected_dim=16)
    with pytest.raises(IndexMismatchError, match=f"dimension {D} but the model produces 8"):
        create_index("milvus", 8, "cosine", uri=uri, collection=milvus_collection)
    with pytest.raises(IndexMismatchError, match="uses metric 'cosine', not 'ip'"):
        create_index("milvus", D, "ip", uri=uri, collection=milvus_collection)
    with pytest.raises(IndexMismatchError, match="has no collection 'nothing_here'"):
        open_milvus_index(uri, "nothing_here")
    index.drop()
    assert len(create_index("milvus", 8, "ip", uri=uri, collection=milvus_collection)) == 0  # gone: name reusable


def test_thumbnails_are_stored_beside_the_payload(milvus_server, milvus_collection):
    index = create_index("milvus", D, "ip", uri=milvus_server.uri, collection=milvus_collection)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 KB: above VARCHAR's cap
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    big = buf.getvalue()
    small = png_bytes(Image.new("L", (4, 4), 9))
    index.add([1, 2, 3], random_csr(3, D, 0.5, seed=2), [{"a": 1}, None, None], [big, None, small])
    assert len(big) > 65535
    assert index.thumbnails([1, 2, 3, -1]) == [big, None, small, None]
    assert index.thumbnail_count == 2
    index.add([3], random_csr(1, D, 0.5, seed=3))  # replaced without a thumbnail: it is gone
    assert index.thumbnails([3]) == [None] and index.thumbnail_count == 1
    items = index.items([1, 2, 404])
    assert set(items) == {1, 2} and items[1]["thumbnail"] == big and items[1]["payload"] == {"a": 1}


def test_ids_page_through_more_than_one_query_window(milvus_server, milvus_collection, monkeypatch):
    monkeypatch.setattr(milvus_index, "_ID_PAGE", 64)  # Milvus's window is MAX_TOPK; small pages, same code
    index = create_index("milvus", 4, "ip", uri=milvus_server.uri, collection=milvus_collection, batch_rows=50)
    ids = np.random.default_rng(4).choice(10**15, 64 * 3 + 7, replace=False)
    index.add(ids, np.ones((ids.size, 4), np.float32))  # several upsert batches
    assert np.array_equal(index.ids(), np.sort(ids))
    with pytest.raises(InvalidInputError, match=f"at most {MAX_TOPK} results"):
        index.search(np.ones((1, 4)), MAX_TOPK + 1)


def test_bad_milvus_options_fail_before_connecting(tmp_path):
    for options, message in [
        ({}, "missing 1 required keyword-only argument: 'uri'|needs a uri"),
        ({"uri": str(tmp_path / "x.sqlite")}, "file ending in .db"),
        ({"uri": str(tmp_path / "x.db"), "index": "hnsw"}, "unknown milvus index 'hnsw'"),
        ({"uri": str(tmp_path / "x.db"), "collection": "no-dashes"}, "collection name must be"),
        ({"uri": str(tmp_path / "x.db"), "timeout_s": 0}, "timeout_s must be positive"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            create_index("milvus", 8, "ip", **options)


def test_embedded_file_persists_across_reopen(tmp_path):
    """A local .db uri: pymilvus starts Milvus Lite itself; the data is there after the process lets go of it."""
    path = str(tmp_path / "embedded.db")
    index = create_index("milvus", D, "ip", uri=path, collection="items")
    x = random_csr(20, D, 0.4, seed=5)
    index.add(np.arange(20), x, [{"i": i} for i in range(20)])
    index.save()
    index.close()
    reopened = open_milvus_index(path, "items", expected_dim=D)
    assert len(reopened) == 20 and reopened.payload(19) == {"i": 19}
    np.testing.assert_allclose(reopened.reconstruct([3]).toarray(), x[3].toarray(), rtol=1e-6)
    reopened.close()


def test_server_down_is_backend_unavailable_within_the_timeout_and_recovers(tmp_path):
    with pytest.raises(BackendUnavailableError, match="cannot connect"):
        create_index("milvus", 8, "ip", uri=f"http://127.0.0.1:{free_port()}", timeout_s=1)
    server = LocalMilvus(tmp_path / "srv", free_port()).start()
    try:
        index = create_index("milvus", 8, "ip", uri=server.uri, collection="c", timeout_s=1)
        index.add([1], np.ones((1, 8)))
        server.kill()
        for call in (lambda: index.search(np.ones((1, 8)), 2), lambda: index.add([2], np.ones((1, 8))), index.ids):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                call()
            assert time.monotonic() - t0 < 6  # ~2 x timeout_s, never pymilvus's minutes of retries
        assert not index.available
        server.start()
        assert index.ids().tolist() == [1]  # the add that failed is not there; the acknowledged one is
        assert index.available
    finally:
        server.stop()


def test_lpjepa_milvus_serve_is_a_server_other_processes_share(tmp_path):
    """`lpjepa milvus serve` as a process: clients connect over TCP, SIGTERM stops it, the data is kept."""
    import signal
    import subprocess
    import sys

    from index.milvus_server import port_open

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "milvus",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
    ]
    for round_ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "serving" in proc.stdout.readline()
            index = create_index("milvus", 4, "ip", uri=f"http://127.0.0.1:{port}", collection="shared")
            if round_ == 0:
                index.add([1, 2], np.eye(4, dtype=np.float32)[:2], [{"a": 1}, {"b": 2}])
            assert index.payloads([1, 2]) == [{"a": 1}, {"b": 2}]  # round 1: after a restart
            index.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 128 + signal.SIGTERM, proc.stderr.read()
        assert not port_open("127.0.0.1", port)
    # SIGKILL of `lpjepa milvus serve` itself: its milvus-lite child must not outlive it (PR_SET_PDEATHSIG)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "serving" in proc.stdout.readline() and port_open("127.0.0.1", port)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open("127.0.0.1", port)
    import socket

    with socket.socket() as taken:  # a port someone else listens on: one line, exit 2
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = subprocess.run([*cmd[:-1], str(taken.getsockname()[1])], capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and "already in use" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
