"""The served OOD score and the drift monitor through the HTTP API: /v1/drift, the gauges, the response fields."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from helpers import fashion_images, png_bytes
from PIL import ImageOps

from serve.app import create_app
from serve.settings import ServeSettings


@pytest.fixture(scope="module")
def models(model_path, calibrated_model):
    return model_path, *calibrated_model


def files(images) -> list:
    return [("files", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(images)]


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_drift_monitor_stays_quiet_on_id_traffic_and_alarms_on_a_shift(models, tmp_path):
    _, calibrated, cal = models
    window = cal["drift"]["window"]
    settings = ServeSettings(model_path=calibrated, max_images_per_request=16, max_wait_ms=1.0)
    with TestClient(create_app(settings)) as c:
        first = c.get("/v1/drift").json()
        assert first["enabled"] is True and first["window_count"] == 0 and first["pvalue"] is None
        assert first["window_size"] == window and first["false_alarm_rate"] == pytest.approx(1e-4)
        assert "Bonferroni" in first["test"]
        id_images = fashion_images(2 * window, offset=3000)  # same distribution as the calibration images
        for start in range(0, len(id_images), 16):
            route = "/v1/embed" if start % 32 == 0 else "/v1/ood"
            assert c.post(route, files=files(id_images[start : start + 16])).status_code == 200
        quiet = c.get("/v1/drift").json()
        assert quiet["window_count"] == window and quiet["pvalue"] is not None
        assert quiet["alarm"] is False and quiet["alarms"] == 0, quiet
        assert abs(quiet["window_l0"] - cal["l0"]["mean"]) < 4 * cal["l0"]["std"]
        metrics = c.get("/metrics").text
        assert gauge(metrics, "lpjepa_drift_alarm") == 0.0
        assert gauge(metrics, "lpjepa_drift_pvalue") == pytest.approx(quiet["pvalue"])
        assert gauge(metrics, "lpjepa_drift_window_l0") == pytest.approx(quiet["window_l0"])

        shifted = [ImageOps.invert(img) for img in fashion_images(window, offset=5000)]
        for start in range(0, len(shifted), 16):
            assert c.post("/v1/embed", files=files(shifted[start : start + 16])).status_code == 200
        loud = c.get("/v1/drift").json()
        assert loud["alarm"] is True and loud["pvalue"] < 1e-4 and loud["alarms"] == 1, loud
        assert gauge(c.get("/metrics").text, "lpjepa_drift_alarm") == 1.0


def test_item_writes_do_not_feed_the_monitor(models, tmp_path):
    _, calibrated, _ = models
    settings = ServeSettings(model_path=calibrated, index_dir=tmp_path / "idx", max_images_per_request=16)
    with TestClient(create_app(settings)) as c:
        r = c.put("/v1/items", files=files(fashion_images(4)), data={"ids": "[1, 2, 3, 4]"})
        assert r.status_code == 200, r.text
        assert c.get("/v1/drift").json()["images"] == 0
        hit = c.post("/v1/search", files=[("file", ("q.png", png_bytes(fashion_images(1)[0]), "image/png"))])
        assert hit.status_code == 200, hit.text
        assert hit.json()["query"]["ood_score_name"] == "feature_mahalanobis"
        assert c.get("/v1/drift").json()["images"] == 1
        info = c.get("/v1/info").json()
        assert info["index_size"] == 4 and info["backend"] == "csr" and info["ood"]["served"] == "feature_mahalanobis"


def test_uncalibrated_model_answers_drift_disabled(models, tmp_path):
    plain, _, _ = models
    with TestClient(create_app(ServeSettings(model_path=plain))) as c:
        body = c.get("/v1/drift")
        assert body.status_code == 200
        assert body.json()["enabled"] is False and body.json()["pvalue"] is None
        assert "target_l0" in c.get("/v1/info").json()
