"""The web page in headless Chromium, driven by Selenium through Debian's chromium-driver, against a real
`lpjepa serve` on loopback whose index `lpjepa index build` made from real Fashion-MNIST images.

The page is used as a person would: files are chosen in its file input (several at once), and the test waits
for what the page's JavaScript draws. What it shows is checked against independent sources: the embedding
computed in this process by the ONNX runtime, the index build's own payloads and thumbnails, and the server's
/v1/ood verdict for the same bytes.

Also runnable as a script, to take the README screenshot of another server with this same code path:
    python tests/test_serve_web.py --url http://127.0.0.1:8765 --out docs/img/web.png IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "web-key"
N_INDEXED = 300
ARTIFACTS = ROOT / "artifacts" / "test-web"  # screenshots a person can look at after a run (ignored by git)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - selenium is in the dev extra
    webdriver = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver"),
    pytest.mark.skipif(webdriver is None, reason="needs selenium (pip install -e '.[dev]')"),
]


# ------------------------------------------------------------------------------------------ driving the page
@contextlib.contextmanager
def browser(width: int = 1280, height: int = 1000, *, mobile: bool = False) -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium; the paths are given so Selenium Manager never tries to download a driver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="lpjepa-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        if mobile:  # a phone's viewport; a desktop window cannot be made this narrow
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
            )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "st-model").text not in ("", "loading…"))


def search(driver: webdriver.Chrome, paths: list[Path], *, k: int = 8, timeout: float = 90) -> list[dict]:
    """Choose `paths` in the page's file input and wait until every card is done or failed; returns the cards."""
    k_box = driver.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(k))
    before = len(driver.find_elements(By.CSS_SELECTOR, "#results article.result"))
    driver.find_element(By.ID, "file").send_keys("\n".join(str(Path(p).resolve()) for p in paths))
    want = before + len(paths)
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script(
            "const c = [...document.querySelectorAll('#results article.result')];"
            "return c.length === arguments[0] && c.every(x => x.dataset.state !== 'loading')"
            " && document.body.dataset.state === 'done';",
            want,
        )
    )
    driver.execute_script("document.activeElement && document.activeElement.blur()")  # no focus ring in shots
    return driver.execute_script(CARDS_JS)[: len(paths)]


CARDS_JS = """
return [...document.querySelectorAll('#results article.result')].map(card => {
  const q = (s) => card.querySelector(s);
  return {
    name: card.dataset.name, state: card.dataset.state, status: card.dataset.status || null,
    error: q('.error').hidden ? null : q('.error').textContent,
    preview: q('.preview').naturalWidth,
    l0: q('.l0').textContent, codeHidden: q('.code').hidden,
    targetShown: !q('.l0-target').hidden,
    on: [...card.querySelectorAll('.code-chart rect.on')].map(r => +r.dataset.dim),
    bars: card.querySelectorAll('.code-chart rect').length,
    badge: q('.ood-badge').hidden ? null : q('.ood-badge').textContent,
    verdict: q('.ood-badge').dataset.verdict || null,
    hits: [...card.querySelectorAll('.neighbours li.hit')].map(li => {
      const img = li.querySelector('img');
      return {id: +li.dataset.id, text: li.textContent, w: img ? img.naturalWidth : 0, h: img ? img.naturalHeight : 0,
              complete: img ? img.complete : false};
    }),
  };
});
"""


def full_page_png(driver: webdriver.Chrome) -> bytes:
    """The whole page, not only the viewport (Chromium's own capture beyond the viewport)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    return base64.b64decode(shot["data"])


def capture(url: str, images: list[Path], out: Path, *, width: int = 1280, k: int = 8) -> list[dict]:
    """Search `images` on the page of the server at `url` and save a full-page screenshot (the README's)."""
    with browser(width, 900) as driver:
        open_page(driver, url)
        cards = search(driver, images, k=k)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(full_page_png(driver))
    return cards


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def served(calibrated_model, tmp_path_factory):
    """A calibrated tiny model, an index of the first N_INDEXED Fashion-MNIST test images built by the CLI
    (thumbnails on by default), and `lpjepa serve` over both."""
    from helpers import ServerProcess, run_cli

    model, _ = calibrated_model
    index_dir = tmp_path_factory.mktemp("web") / "index"
    built = run_cli("index", "build", "--model", str(model), "--data", "fashion-mnist:test", "--out", str(index_dir),
                    "--limit", str(N_INDEXED), "--no-progress")  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["thumbnails"] == N_INDEXED
    proc = ServerProcess("--model", str(model), "--index", str(index_dir), "--api-key", KEY)
    yield proc, model, index_dir
    proc.stop()


def pct(x: float) -> str:
    """The page's percentage format (app.js pct)."""
    return f"{100 * x:.{2 if x < 0.1 else 1}f}%"


def save_png(img: Image.Image, path: Path) -> Path:
    img.save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------ tests
def test_search_shows_code_ood_verdict_and_neighbour_thumbnails(served, fmnist, tmp_path):
    proc, model, index_dir = served
    from helpers import cifar_files

    from export.runtime import EmbeddingRuntime
    from index import load_index

    indexed = save_png(fmnist.image(3), tmp_path / "indexed-row-3.png")  # its own item must come back first
    unseen = save_png(fmnist.image(4321), tmp_path / "unseen-row-4321.png")
    photo = cifar_files()[0]  # a real colour photo: another distribution
    queries = [indexed, unseen, photo]
    with proc.client() as c:
        info = c.get("/v1/info").json()
        ood = [c.post("/v1/ood", files={"files": (p.name, p.read_bytes())}).json() for p in queries]
    runtime = EmbeddingRuntime(str(model))
    expected = runtime.embed([p.read_bytes() for p in queries])
    index = load_index(index_dir)
    with proc.client() as c:  # the API the page relies on returns the index build's thumbnails
        item = c.get("/v1/items/3").json()
        assert base64.b64decode(item["thumbnail"]) == index.thumbnails([3])[0]
        body = {"image": base64.b64encode(indexed.read_bytes()).decode(), "k": 5, "thumbnails": True}
        hits = c.post("/v1/search", json=body).json()["results"]
        assert hits[0]["id"] == 3 and len(hits) == 5
        assert all(base64.b64decode(h["thumbnail"]) == index.thumbnails([h["id"]])[0] for h in hits)

    with browser() as driver:
        open_page(driver, proc.url)
        status = {key: driver.find_element(By.ID, f"st-{key}").text for key in ("model", "index", "backend", "ood")}
        assert status["index"] == f"{N_INDEXED} items" and status["backend"] == "csr"
        assert f"{info['dim']} dims" in status["model"]
        assert f"{info['ood']['threshold']:.3f}" in status["ood"]
        cards = search(driver, queries, k=8)
        assert [c["name"] for c in cards] == [p.name for p in queries]  # in the order chosen
        for card, row, verdict in zip(cards, expected, ood, strict=True):
            assert card["state"] == "done" and card["error"] is None, card
            assert card["preview"] > 0
            assert card["bars"] == info["dim"] and sorted(card["on"]) == row.indices.tolist()
            assert f"{row.nnz} of {info['dim']} dimensions active" in card["l0"]
            if info["target_l0"] is not None:
                assert f"target {pct(info['target_l0'])}" in card["l0"] and card["targetShown"]
            result = verdict["results"][0]
            assert card["verdict"] == ("ood" if result["is_ood"] else "in")
            assert f"{result['score']:.3f}" in card["badge"]
            if result.get("score_name"):  # the served score, named on the badge
                assert result["score_name"] in card["badge"]
            assert f"threshold {verdict['threshold']:.3f}" in card["badge"]
            assert len(card["hits"]) == 8
            for hit in card["hits"]:  # every neighbour shows the thumbnail the index build stored for it
                assert hit["complete"] and hit["w"] == 28 and hit["h"] == 28, hit
                assert fmnist.classes[fmnist[hit["id"]][1]] in hit["text"]
            stored = Image.open(io.BytesIO(index.thumbnails([card["hits"][0]["id"]])[0]))
            assert stored.size == (28, 28)
        assert cards[0]["hits"][0]["id"] == 3 and "1.000" in cards[0]["hits"][0]["text"]
        recent = driver.find_element(By.ID, "recent-summary").text
        assert "over 3 images" in recent
        drift = driver.find_element(By.ID, "st-drift").text
        assert drift and drift != "\u2013"  # either the server's drift state or that it reports none

        png = full_page_png(driver)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "search.png").write_bytes(png)
        (tmp_path / "search.png").write_bytes(png)
        shot = Image.open(io.BytesIO(png))
        pixels = np.asarray(shot.convert("L"), dtype=np.float32)
        assert shot.size[0] == 1280 and shot.size[1] > 1000 and pixels.std() > 5  # rendered, not a blank page


def test_bad_files_fail_inline_in_words_without_stopping_the_others(served, fmnist, tmp_path):
    proc, _, _ = served
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n" * 20)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    huge = save_png(Image.new("L", (7000, 7000), 200), tmp_path / "huge.png")  # 49 MP: over the 40 MP limit
    good = save_png(fmnist.image(10), tmp_path / "good.png")
    with browser() as driver:
        open_page(driver, proc.url)
        cards = search(driver, [notes, broken, huge, good])
        live = driver.find_element(By.ID, "live").get_attribute("textContent")  # what a screen reader announces
        assert live == "4 images searched, 3 failed; results below.", live
    by_name = {c["name"]: c for c in cards}
    assert by_name["notes.txt"]["state"] == "error" and by_name["notes.txt"]["status"] == "415"
    assert "Not an image this server accepts" in by_name["notes.txt"]["error"]
    assert by_name["notes.txt"]["codeHidden"] and not by_name["notes.txt"]["hits"]
    assert by_name["broken.png"]["state"] == "error" and by_name["broken.png"]["status"] == "422"
    assert "could not use this file" in by_name["broken.png"]["error"]
    assert "broken.png" in by_name["broken.png"]["error"]  # the server's message names the file
    assert by_name["huge.png"]["state"] == "error" and by_name["huge.png"]["status"] == "413"
    assert "Too large for this server" in by_name["huge.png"]["error"]
    assert by_name["good.png"]["state"] == "done" and by_name["good.png"]["hits"][0]["id"] == 10


def test_phone_width_375_px(served, fmnist, tmp_path):
    """At 375 CSS px nothing scrolls sideways, upload and status come before the results, the grid fits."""
    proc, _, _ = served
    with browser(375, 812, mobile=True) as driver:
        open_page(driver, proc.url)
        cards = search(driver, [save_png(fmnist.image(3), tmp_path / "q.png")], k=6)
        assert cards[0]["state"] == "done" and all(h["w"] > 0 for h in cards[0]["hits"])
        layout = driver.execute_script(
            "const r = (s) => document.querySelector(s).getBoundingClientRect();"
            "return {inner: innerWidth, scroll: document.documentElement.scrollWidth,"
            " upload: r('#upload-panel').top, status: r('#status-panel').top, results: r('#results').top,"
            " grid: r('.neighbours').right, lastHit: Math.max(...[...document.querySelectorAll('.hit')]"
            ".map(h => h.getBoundingClientRect().right))};"
        )
        assert layout["inner"] == 375 and layout["scroll"] <= 375, layout
        assert layout["upload"] < layout["status"] < layout["results"], layout
        assert layout["lastHit"] <= layout["grid"] <= 375, layout
        png = full_page_png(driver)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "search-375px.png").write_bytes(png)


def test_controls_are_labelled_and_reachable_by_keyboard(served):
    proc, _, _ = served
    with browser() as driver:
        open_page(driver, proc.url)
        unlabelled = driver.execute_script(
            "return [...document.querySelectorAll('input, button')].filter(e => !(e.labels && e.labels.length)"
            " && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.id || e.outerHTML);"
        )
        assert unlabelled == []
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        reached = []
        for _ in range(8):  # Tab through the page as a keyboard user would
            ActionChains(driver).send_keys(Keys.TAB).perform()
            reached.append(driver.execute_script("return document.activeElement.id || document.activeElement.tagName"))
        assert {"file", "k", "api-key", "clear"} <= set(reached), reached


def test_dropped_images_are_searched(served, fmnist):
    """Dropping files on the drop zone (a real DragEvent carrying a DataTransfer, as the browser builds on a drop)
    searches them like chosen files."""
    proc, _, _ = served
    from helpers import png_bytes

    data = base64.b64encode(png_bytes(fmnist.image(5))).decode()
    with browser() as driver:
        open_page(driver, proc.url)
        driver.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
            "const dt = new DataTransfer();"
            "dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
            "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,"
            " cancelable: true}));",
            data,
        )
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.state === 'done'"))
        card = driver.execute_script(CARDS_JS)[0]
    assert card["name"] == "dropped.png" and card["state"] == "done"
    assert card["hits"][0]["id"] == 5 and all(h["w"] == 28 for h in card["hits"])


def test_drift_panel_raises_the_alarm_after_a_window_of_digits(served):
    """A full window of real MNIST digits (another distribution) through /v1/embed: the status panel must say so.
    Runs after the searches above (module order), whose few Fashion-MNIST inputs share the window."""
    proc, _, _ = served
    from helpers import png_bytes

    from data.sources import open_source

    with proc.client() as c:
        drift = c.get("/v1/drift").json()
        if not drift.get("enabled"):
            pytest.skip("this server's model has no drift reference")
        digits = open_source("mnist")
        window = int(drift["window_size"])
        for lo in range(0, window, 32):
            files = [("files", (f"{i}.png", png_bytes(digits.image(i)), "image/png")) for i in range(lo, lo + 32)]
            assert c.post("/v1/embed", files=files).status_code == 200
        drift = c.get("/v1/drift").json()
    assert drift["alarm"], drift  # 64 digits against a Fashion-MNIST calibration at a 1e-4 false-alarm rate
    with browser() as driver:
        open_page(driver, proc.url)
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "st-drift").get_attribute("data-state"))
        panel = driver.find_element(By.ID, "st-drift")
        assert panel.get_attribute("data-state") == "alarm" and "ALARM" in panel.text, panel.text
        assert f"p = {drift['pvalue']:.2g}"[:6] in panel.text


def test_milvus_backend_serves_the_index_builds_thumbnails_to_the_page(served, fmnist, milvus_server, tmp_path):
    """The same page over the stateless Milvus mode: `lpjepa index build --backend milvus` stores each thumbnail in
    the collection, `lpjepa serve --backend milvus` reads them back, the page shows them and names the backend."""
    from helpers import ServerProcess, run_cli

    _, model, _ = served
    collection = f"web_{tmp_path.name[-12:]}".replace("-", "_")
    milvus = ("--backend", "milvus", "--milvus-uri", milvus_server.uri, "--collection", collection)
    built = run_cli("index", "build", "--model", str(model), "--data", "fashion-mnist:test", "--limit", "120",
                    "--no-progress", *milvus)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["thumbnails"] == 120
    proc = ServerProcess("--model", str(model), *milvus)
    try:
        with browser() as driver:
            open_page(driver, proc.url)
            assert driver.find_element(By.ID, "st-backend").text == "milvus"
            assert driver.find_element(By.ID, "st-index").text == "120 items"
            cards = search(driver, [save_png(fmnist.image(7), tmp_path / "row-7.png")], k=6)
        hits = cards[0]["hits"]
        assert cards[0]["state"] == "done" and hits[0]["id"] == 7 and len(hits) == 6
        assert all(h["complete"] and h["w"] == 28 and h["h"] == 28 for h in hits), hits
    finally:
        proc.stop()


# ------------------------------------------------------------------------------------------ script entry
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="screenshot the web page after a search (README image)")
    parser.add_argument("--url", required=True, help="a running `lpjepa serve`, e.g. http://127.0.0.1:8765")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("images", type=Path, nargs="+")
    args = parser.parse_args(argv)
    cards = capture(args.url.rstrip("/"), args.images, args.out, width=args.width, k=args.k)
    print(json.dumps([{k: c[k] for k in ("name", "state", "verdict", "l0")} for c in cards], indent=1))
    return 0 if all(c["state"] == "done" for c in cards) else 1


if __name__ == "__main__":
    sys.exit(_main())
