"""Stateless `lpjepa serve` replicas over one real Milvus (milvus-lite's server on a loopback port), as processes.

Replica A and replica B share the session's Milvus: a write through one is searchable through the other; SIGKILL
of a replica amid concurrent writers loses no acknowledged write; Milvus stopped under load gives 503s (never a
500, never a hang), /readyz not ready, and the service recovers when Milvus is back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from helpers import ServerProcess, run_cli

from index.milvus_server import LocalMilvus, free_port

KEY = "milvus-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIM = 64

pytestmark = pytest.mark.slow


def replica(model_path, uri: str, collection: str, *extra: str) -> ServerProcess:
    return ServerProcess(
        "--model", str(model_path), "--backend", "milvus", "--milvus-uri", uri, "--collection", collection,
        "--api-key", KEY, "--milvus-timeout", "1", *extra,
    )  # fmt: skip


def embedding(item_id: int) -> dict:
    rng = np.random.default_rng(item_id)
    dims = rng.choice(DIM, size=4, replace=False)
    return {"indices": sorted(dims.tolist()), "values": (rng.random(4) + 0.5).tolist()}


def put(client: httpx.Client, item_id: int) -> httpx.Response:
    emb = embedding(item_id)
    body = {"items": [{"id": item_id, "embedding": emb, "payload": {"id": item_id}}]}
    return client.put("/v1/items", headers=AUTH, json=body)


def test_replicas_share_writes_and_a_killed_replica_loses_no_acknowledged_write(model_path, milvus_server):
    a = replica(model_path, milvus_server.uri, "replicas")
    b = replica(model_path, milvus_server.uri, "replicas")
    try:
        with a.client() as ca, b.client() as cb:
            assert put(ca, 1).status_code == 200
            got = cb.get("/v1/items/1").json()  # Strong consistency: B reads A's acknowledged write at once
            assert got["payload"] == {"id": 1} and got["embedding"]["indices"] == embedding(1)["indices"]
            hits = cb.post("/v1/search", json={"embedding": embedding(1), "k": 3}).json()["results"]
            assert hits[0]["id"] == 1 and hits[0]["payload"] == {"id": 1}
            assert cb.delete("/v1/items/1", headers=AUTH).status_code == 200
            assert ca.get("/v1/items/1").status_code == 404
            info = cb.get("/v1/info").json()["index"]
            assert info["backend"] == "milvus" and info["durability"] == "backend" and info["collection"] == "replicas"
            assert info["directory"] is None

        acked: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()

        def writer(w: int) -> None:
            with a.client() as c:
                for j in range(10_000):
                    if stop.is_set():
                        return
                    item_id = 1000 * (w + 1) + j
                    try:
                        r = put(c, item_id)
                    except httpx.HTTPError:
                        return  # A died under this request: it was never acknowledged
                    if r.status_code == 200:
                        with lock:
                            acked.append(item_id)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        a.kill()  # SIGKILL amid 8 writers
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acked) >= 40
        with b.client() as cb:
            for item_id in acked:
                r = cb.get(f"/v1/items/{item_id}", params={"thumbnail": "false"})
                assert r.status_code == 200, (item_id, r.text)
                assert r.json()["payload"] == {"id": item_id}
            assert cb.get("/v1/info").json()["index"]["size"] >= len(acked)
    finally:
        a.kill()
        b.stop()


def test_milvus_down_is_503_never_500_and_the_replica_recovers(model_path, tmp_path):
    server = LocalMilvus(tmp_path / "milvus", free_port()).start()
    proc = replica(model_path, server.uri, "outage")
    try:
        with proc.client() as c:
            for i in range(5):
                assert put(c, i).status_code == 200
            statuses: Counter[int] = Counter()
            slowest = 0.0
            stop = threading.Event()

            def load() -> None:
                nonlocal slowest
                with proc.client() as lc:
                    i = 100
                    while not stop.is_set():
                        i += 1
                        t0 = time.monotonic()
                        r = put(lc, i) if i % 2 else lc.post("/v1/search", json={"embedding": embedding(i), "k": 3})
                        slowest = max(slowest, time.monotonic() - t0)
                        statuses[r.status_code] += 1
                        if r.status_code == 503:
                            assert r.headers["retry-after"] and r.json()["error"]["code"] == "backend_unavailable"

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            server.kill()  # Milvus gone mid-load
            time.sleep(3)
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["backend"] is False
            assert c.get("/v1/items/1").status_code == 503
            assert c.get("/metrics").status_code == 200  # still scrapeable
            stop.set()
            for t in threads:
                t.join(30)
            assert statuses[503] > 0 and set(statuses) <= {200, 503}, statuses
            assert slowest < 10  # --milvus-timeout 1: a dead Milvus is reported in ~2 s, never a hang

            server.start()  # back: the replica reconnects by itself
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/readyz").status_code == 200
            assert put(c, 99).status_code == 200
            for i in (0, 4, 99):
                assert c.get(f"/v1/items/{i}").json()["payload"] == {"id": i}
    finally:
        proc.stop()
        server.stop()


def test_workers_processes_serve_one_collection(model_path, milvus_server):
    proc = replica(model_path, milvus_server.uri, "workers", "--workers", "2")
    try:
        with proc.client() as c:
            for i in range(6):
                assert put(c, i).status_code == 200
            for _ in range(3):  # whichever worker answers, it sees every write
                assert c.get("/v1/info").json()["index"]["size"] == 6
                hits = c.post("/v1/search", json={"embedding": embedding(4), "k": 1}).json()["results"]
                assert hits[0]["id"] == 4
    finally:
        assert proc.stop() in (0, -15)


def test_embedded_milvus_file_persists_across_restarts_and_cli_errors(model_path, tmp_path):
    db = str(tmp_path / "x.db")
    first = replica(model_path, db, "embedded")
    with first.client() as c:
        assert put(c, 7).status_code == 200
    assert first.stop() in (0, -15)
    second = replica(model_path, db, "embedded")  # the first let go of the file: a new process may open it
    try:
        with second.client() as c:
            assert c.get("/v1/items/7").json()["payload"] == {"id": 7}
            assert c.post("/v1/search", json={"embedding": embedding(7), "k": 1}).json()["results"][0]["id"] == 7
    finally:
        second.stop()
    base = ["serve", "--model", str(model_path), "--port", "0"]
    for argv, message in [
        (base + ["--backend", "milvus"], "needs --milvus-uri"),
        (base + ["--backend", "milvus", "--milvus-uri", db, "--workers", "2"], "--workers > 1 needs"),
        (base + ["--milvus-uri", db], "--milvus-uri is for --backend milvus"),
        (base + ["--backend", "milvus", "--milvus-uri", db, "--index", str(tmp_path / "i")], "--index is for csr"),
        (base + ["--backend", "milvus", "--milvus-uri", f"http://127.0.0.1:{free_port()}", "--milvus-timeout", "1"],
         "cannot connect to Milvus"),
    ]:  # fmt: skip
        done = run_cli(*argv)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
            argv,
            done.stderr,
        )
