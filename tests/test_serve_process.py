"""`lpjepa serve` as a real uvicorn process on loopback: endpoints, CLI errors, restart and SIGKILL durability."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import ServerProcess, fashion_pngs, run_cli

KEY = "process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIM = 64


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("proc") / "index"
    proc = ServerProcess("--model", str(model_path), "--index", str(index_dir), "--api-key", KEY, "--max-images", "4")
    yield proc
    proc.stop()


def test_every_endpoint_over_loopback(server):
    data = fashion_pngs(4, offset=40)
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/info").json()["dim"] == DIM
        assert "Rectified LpJEPA" in c.get("/").text
        embedded = c.post("/v1/embed", files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)])
        assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 4
        denied = c.put("/v1/items", files=[("files", ("a.png", data[0], "image/png"))], data={"ids": "[1]"})
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
        put = c.put(
            "/v1/items",
            headers=AUTH,
            files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)],
            data={"ids": "1,2,3,4", "payloads": json.dumps([{"k": i} for i in range(4)])},
        )
        assert put.status_code == 200, put.text
        hits = c.post("/v1/search", files={"file": ("q.png", data[2], "image/png")}, data={"k": "2"}).json()
        assert len(hits["results"]) == 2 and hits["query"]["nnz"] > 0
        assert c.get("/v1/items/3").json()["payload"] == {"k": 2}
        assert c.delete("/v1/items/3", headers=AUTH).json()["deleted"] is True
        assert c.get("/v1/items/3").status_code == 404
        assert c.post("/v1/ood", files={"files": ("a.png", data[0], "image/png")}).status_code == 409
        too_many = c.post("/v1/embed", files=[("files", ("x.png", data[0], "image/png"))] * 5)
        assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_many_images"
        bad = c.post("/v1/embed", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
        metrics = c.get("/metrics").text
        assert 'route="/v1/embed",status="200"' in metrics and "lpjepa_index_items 3.0" in metrics


def test_oversized_body_is_refused_without_reading_it(server):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
        )
        reply = b""
        while b"payload_too_large" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "payload_too_large" in reply


def test_cli_errors_are_one_line_with_exit_code_2(model_path, tmp_path, lpjepa):
    rc, _, err = lpjepa("serve", "--model", str(tmp_path / "nope.onnx"))
    assert rc == 2 and "no model file" in err and err.count("\n") == 1
    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_bytes(b"this is not an onnx file")
    rc, _, err = lpjepa("serve", "--model", str(not_onnx), "--port", "0")
    assert rc == 2 and "cannot load model" in err and err.count("\n") == 1
    rc, _, err = lpjepa("serve", "--model", str(model_path), "--auth-reads")
    assert rc == 2 and "--auth-reads needs --api-key" in err
    rc, _, err = lpjepa("serve", "--model", str(model_path), "--max-batch", "0")
    assert rc == 2 and "max_batch" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, _, err = lpjepa("serve", "--model", str(model_path), "--port", str(port))
    assert rc == 2 and "cannot listen" in err
    not_index = tmp_path / "not-an-index"
    not_index.mkdir()
    (not_index / "notes.txt").write_text("a user's file")
    rc, _, err = lpjepa("serve", "--model", str(model_path), "--index", str(not_index), "--port", "0")
    assert rc == 2 and "cannot open index" in err and (not_index / "notes.txt").read_text() == "a user's file"
    # argparse errors are one line and exit 2 as well
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve"])
    assert exc.value.code == 2


def test_index_of_another_dimension_is_refused(model_path, tmp_path, lpjepa):
    from index.factory import create_index

    create_index(backend="csr", dim=DIM + 1, metric="ip").save(tmp_path / "idx")
    rc, _, err = lpjepa("serve", "--model", str(model_path), "--index", str(tmp_path / "idx"), "--port", "0")
    assert rc == 2 and "dimension 65" in err and "64" in err and err.count("\n") == 1


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = run_cli("serve", "--model", str(tmp_path / "missing.onnx"))
    assert result.returncode == 2 and "no model file" in result.stderr and "Traceback" not in result.stderr


def _put(client: httpx.Client, item_id: int) -> httpx.Response:
    rng = np.random.default_rng(item_id)
    dims = rng.choice(DIM, size=3, replace=False)
    emb = {"indices": dims.tolist(), "values": (rng.random(3) + 0.5).tolist()}
    return client.put(
        "/v1/items",
        headers=AUTH,
        json={"items": [{"id": item_id, "embedding": emb, "payload": {"id": item_id, "dims": emb}}]},
    )


def test_restart_and_sigkill_lose_nothing_acknowledged(model_path, tmp_path):
    """A stream of writes, SIGKILL in the middle of it; every acknowledged id is there after the restart.
    Then a graceful stop (SIGTERM) snapshots and checkpoints the database, and a second restart still has everything."""
    index_dir = tmp_path / "index"
    args = ("--model", str(model_path), "--index", str(index_dir), "--api-key", KEY, "--compact-every", "9")
    first = ServerProcess(*args)
    acked: list[int] = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        with first.client() as c:
            for j in range(10_000):
                if stop.is_set():
                    return
                item_id = worker * 100_000 + j
                try:
                    r = _put(c, item_id)
                except httpx.HTTPError:
                    return  # the server died under us: this write was not acknowledged
                if r.status_code == 200:
                    acked.append(item_id)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.kill()  # SIGKILL while the writers are still sending
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 60

    second = ServerProcess(*args)
    with second.client() as c:
        size = c.get("/v1/info").json()["index"]["size"]
        assert size >= len(acked)  # a write can be durable without its reply having arrived
        for item_id in acked:
            r = c.get(f"/v1/items/{item_id}")
            assert r.status_code == 200, (item_id, r.text)
            assert r.json()["payload"]["id"] == item_id
        # the recovered items are searchable with their own codes
        emb = c.get(f"/v1/items/{acked[-1]}").json()["payload"]["dims"]
        hits = c.post("/v1/search", json={"embedding": emb, "k": 100}).json()["results"]
        assert acked[-1] in [h["id"] for h in hits]
        c.delete(f"/v1/items/{acked[0]}", headers=AUTH).raise_for_status()
        extra = _put(c, 777_777)
        assert extra.status_code == 200
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the exit status is "terminated by SIGTERM".
    assert second.stop() in (0, -signal.SIGTERM)
    journal = index_dir / "serve.sqlite3-wal"
    assert not journal.exists() or journal.stat().st_size == 0  # graceful stop: journal folded into the database

    third = ServerProcess(*args)
    with third.client() as c:
        assert c.get(f"/v1/items/{acked[0]}").status_code == 404
        assert c.get("/v1/items/777777").status_code == 200
        for item_id in acked[1:]:
            assert c.get(f"/v1/items/{item_id}").status_code == 200
        assert c.get("/v1/info").json()["index"]["size"] == size
    third.stop()
