"""`lpjepa serve --workers N` without an index: N real processes on one port, each answering embed requests
correctly (embed and OOD hold no state), and the refusal when an in-process index would be split between them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    ServerProcess,
    fashion_images,
    png_bytes,
    reference_embeddings,
    run_cli,
)

pytestmark = pytest.mark.slow


def _worker_pids(parent: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == parent:
                children.add(int(entry))
    return children


def test_two_workers_without_an_index_embed_correctly(model_path):
    images = fashion_images(6, offset=40)
    expected = reference_embeddings(model_path, images)
    server = ServerProcess("--model", str(model_path), "--workers", "2")
    try:
        with server.client() as c:
            for img, ref in zip(images, expected, strict=True):
                r = c.post("/v1/embed", files=[("files", ("x.png", png_bytes(img), "image/png"))])
                assert r.status_code == 200, r.text
                got = r.json()["embeddings"][0]
                idx = np.flatnonzero(ref)
                assert got["indices"] == idx.tolist()
                np.testing.assert_allclose(got["values"], ref[idx], rtol=1e-4, atol=1e-5)
            assert c.get("/v1/info").json()["index"] is None
        assert len(_worker_pids(server.proc.pid)) >= 2  # uvicorn's supervisor runs the two worker processes
    finally:
        assert server.stop() in (0, -15)


def test_workers_with_an_in_process_index_are_refused(model_path, tmp_path):
    done = run_cli("serve", "--model", str(model_path), "--port", "0", "--index", str(tmp_path / "i"), "--workers", "2")
    assert done.returncode == 2
    assert "--workers > 1 needs no --index" in done.stderr and len(done.stderr.strip().splitlines()) == 1
