"""Defect 4 of issue 14: a 154 KB PNG of 6300 x 6300 RGBA decodes to ~150 MB, and 8 in one request took the server
to ~1.6 GB. The per-request pixel budget is checked from the image headers before anything is decoded, so such
requests are refused (413) while the server's peak RSS stays where it was."""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import pytest
from helpers import ServerProcess, fashion_pngs

SIDE = 6300  # 39.7 MP: under the per-image limit (40 MP), so only the per-request budget can refuse 8 of them


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_rgba_png(side: int = SIDE) -> bytes:
    """A real, fully decodable all-transparent RGBA PNG, compressed row by row (no side^2 buffer here)."""
    row = b"\x00" + b"\x00" * (4 * side)  # filter byte + pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def server(model_path):
    proc = ServerProcess("--model", str(model_path), "--max-images", "16")
    yield proc
    proc.stop()


@pytest.mark.slow
def test_requests_over_the_pixel_budget_are_refused_with_bounded_memory(server):
    bomb = huge_rgba_png()
    assert len(bomb) < 400_000  # small on the wire, ~159 MB decoded
    files = [("files", (f"b{i}.png", bomb, "image/png")) for i in range(8)]
    with server.client() as c:
        # warm up the request path (first embed, thread pools) so the baseline includes its memory
        assert c.post("/v1/embed", files=[("files", ("ok.png", fashion_pngs(1)[0], "image/png"))]).status_code == 200
        before = peak_rss_mb(server.proc.pid)
        statuses: list[int] = []
        errors: list[str] = []

        def send() -> None:
            with server.client() as cc:
                r = cc.post("/v1/embed", files=files)
                statuses.append(r.status_code)
                errors.append(r.json()["error"]["code"])

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = peak_rss_mb(server.proc.pid)
        assert statuses == [413] * 4 and set(errors) == {"too_many_pixels"}, (statuses, errors)
        # 4 requests x 8 images x 159 MB would be ~5 GB decoded; refused from the headers, the peak barely moves
        assert after - before < 100, (before, after)
        assert c.get("/healthz").status_code == 200
        limits = c.get("/v1/info").json()["limits"]
        assert limits["max_request_pixels"] == 40_000_000
