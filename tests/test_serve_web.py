"""The web page in headless Chromium: upload a real image, see its sparse code, OOD score and neighbours.

Chromium is driven through the DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed
JSON), so no extra package (websockets, playwright) is needed: the test sets the page's file input with
DOM.setFileInputFiles, exactly as a user's file choice, and reads the DOM the page's JavaScript built.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_support import ServerProcess, calibrated_copy, export_tiny_model, fashion_pngs

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
KEY = "web-key"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


class DevTools:
    """The smallest CDP client that works: one pipe pair, synchronous calls with a deadline."""

    def __init__(self, chromium: str, profile: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()
        self._res_read, res_write = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: Chromium expects the pipe on fds 3 and 4
            a, b = os.dup(cmd_read), os.dup(res_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,
        )
        os.close(cmd_read)
        os.close(res_write)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20):
        self._next_id += 1
        msg: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chromium did not answer {method}")
                ready, _, _ = select.select([self._res_read], [], [], left)
                if ready:
                    chunk = os.read(self._res_read, 1 << 20)
                    if not chunk:
                        raise RuntimeError("chromium closed the DevTools pipe")
                    self._buffer += chunk
            frame, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(frame)
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)
        os.close(self._res_read)


class Page:
    def __init__(self, tools: DevTools) -> None:
        self.tools = tools
        target = next(t for t in tools.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = tools.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1100, "height": 1500, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(self, method: str, params: dict | None = None):
        return self.tools.call(method, params, session=self.session)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression}")

    def choose_file(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node})

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """A calibrated model (so the page has an OOD score to show) with 12 real Fashion-MNIST items indexed."""
    base = tmp_path_factory.getbasetemp()
    model, _ = calibrated_copy(export_tiny_model(base), base)
    proc = ServerProcess(
        "--model", str(model), "--index", str(tmp_path_factory.mktemp("web") / "index"), "--api-key", KEY
    )
    data = fashion_pngs(12, offset=500)
    with proc.client() as c:
        r = c.put(
            "/v1/items",
            headers={"Authorization": f"Bearer {KEY}"},
            files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)],
            data={
                "ids": json.dumps(list(range(100, 112))),
                "payloads": json.dumps([{"label": f"fashion {i}"} for i in range(12)]),
            },
        )
        r.raise_for_status()
    yield proc, data
    proc.stop()


def test_upload_shows_sparse_code_ood_and_neighbour_thumbnails(web_server, tmp_path):
    proc, data = web_server
    query = tmp_path / "query.png"
    query.write_bytes(data[3])  # an indexed image: its own item must come back first
    with proc.client() as c:
        expected = c.post("/v1/embed", files={"files": ("q.png", data[3], "image/png")}).json()["embeddings"][0]

    tools = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        page = Page(tools)
        page.call("Page.navigate", {"url": proc.url + "/"})
        page.wait_for(
            "document.readyState === 'complete' && "
            "document.getElementById('model-info').textContent.includes('12 items indexed')"
        )
        assert "OOD calibrated" in page.js("document.getElementById('model-info').textContent")
        page.choose_file("#file", query)
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.js("document.getElementById('error').textContent")

        summary = page.js("document.getElementById('summary').textContent")
        assert summary.startswith(f"{expected['nnz']} of 64 dimensions fire")
        fired = page.js("[...document.querySelectorAll('#code-chart rect.on')].map(r => +r.dataset.dim)")
        assert sorted(fired) == expected["indices"]
        assert page.js("document.querySelectorAll('#code-chart rect').length") == 64
        ood_text = page.js("document.getElementById('ood').textContent")
        assert f"{expected['ood_score']:.3f}" in ood_text
        assert ("out of distribution" if expected["is_ood"] else "in distribution") in ood_text

        hits = page.js(
            "[...document.querySelectorAll('#neighbours figure')].map(f => ({id: +f.dataset.id, "
            "w: f.querySelector('img') ? f.querySelector('img').naturalWidth : 0, "
            "text: f.textContent}))"
        )
        assert len(hits) == 8 and hits[0]["id"] == 103
        assert all(h["w"] > 0 for h in hits), hits  # every neighbour shows its decoded thumbnail
        assert "fashion 3" in hits[0]["text"]

        shot = page.screenshot()
        shot.save(tmp_path / "page.png")
        pixels = np.asarray(shot.convert("L"), dtype=np.float32)
        assert shot.size == (1100, 1500) and pixels.std() > 5  # something was rendered, not a blank page
    finally:
        tools.close()


def test_page_shows_server_errors(web_server, tmp_path):
    proc, _ = web_server
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    tools = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        page = Page(tools)
        page.call("Page.navigate", {"url": proc.url + "/"})
        page.wait_for("document.readyState === 'complete'")
        page.choose_file("#file", bad)
        assert page.wait_for("document.body.dataset.state === 'error'")
        message = page.js("document.getElementById('error').textContent")
        assert "broken.png" in message or "image" in message
        assert page.js("document.getElementById('code-panel').hidden") is True
    finally:
        tools.close()
