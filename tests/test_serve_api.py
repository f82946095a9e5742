"""The HTTP API in process (httpx over ASGI): every endpoint, every error path, auth, metrics, batching, consistency.

A real exported model and a real index; the embeddings are checked against the torch encoder on the evaluation
transform, and search rankings against a brute-force numpy inner product.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import io
import json
import re
import struct
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import (
    API_KEY,
    AUTH,
    DIM,
    assert_error,
    b64,
    cifar_files,
    fashion_images,
    fashion_pngs,
    multipart,
    png_bytes,
    reference_embeddings,
    serve_settings,
)
from PIL import Image

from models.rgg_law import expected_l0
from serve.app import create_app
from serve.settings import ServeSettings

# The index-related tests run three times: the in-process index (csr, durable in SQLite), the same API on an
# embedded Milvus Lite file (--milvus-uri ./x.db) and on a Milvus server (--milvus-uri http://127.0.0.1:PORT, the
# session's local server). The others involve no index and run once.
STORE_MODES = ("local", "milvus-file", "milvus-server")
INDEX_TESTS = {
    "test_health_ready_info_and_openapi",
    "test_items_put_get_replace_delete",
    "test_search_ranks_like_brute_force",
    "test_search_by_image_finds_the_same_image_first",
    "test_search_with_k_larger_than_index_returns_what_exists",
    "test_bad_embeddings_and_search_parameters",
    "test_bad_item_writes",
    "test_auth_reads_flag_and_open_ops_endpoints",
    "test_metrics_expose_requests_batches_queue_index_and_l0",
    "test_concurrent_writes_and_searches_stay_consistent",
}
_store = {"mode": "local", "uri": None}


def pytest_generate_tests(metafunc):
    modes = STORE_MODES if metafunc.function.__name__ in INDEX_TESTS else STORE_MODES[:1]
    metafunc.parametrize("store_mode", modes, indirect=True, scope="module")


@pytest.fixture(scope="module")
def store_mode(request):
    _store["mode"] = request.param
    _store["uri"] = request.getfixturevalue("milvus_server").uri if request.param == "milvus-server" else None
    yield request.param
    _store["mode"] = "local"


@pytest.fixture(autouse=True)
def _in_store_mode(store_mode):
    """Every test takes part in the parametrization (and so runs after its mode was set)."""


def backend_name() -> str:
    return "csr" if _store["mode"] == "local" else "milvus"


def make_settings(model_path, tmp_path, **overrides) -> ServeSettings:
    """Settings of a test app; in the Milvus store modes an index directory becomes a collection of that name."""
    settings = serve_settings(model_path, tmp_path, **overrides)
    if _store["mode"] == "local" or settings.index_dir is None:
        return settings
    name = "api_" + hashlib.sha1(str(settings.index_dir).encode()).hexdigest()[:16]  # same dir, same collection
    uri = str(settings.index_dir.parent / "milvus.db") if _store["mode"] == "milvus-file" else _store["uri"]
    return settings.model_copy(
        update={"index_dir": None, "index_backend": "milvus", "milvus_uri": uri, "milvus_collection": name}
    )


@pytest.fixture(scope="module")
def client(model_path, tmp_path_factory, store_mode):
    app = create_app(make_settings(model_path, tmp_path_factory.mktemp("api")))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def png_declaring_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (a decompression bomb, without the memory)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def dense_of(embedding: dict) -> np.ndarray:
    vec = np.zeros(embedding["dim"], dtype=np.float32)
    vec[embedding["indices"]] = embedding["values"]
    return vec


# ------------------------------------------------------------------------------------------ ops endpoints
def test_health_ready_info_and_openapi(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())
    info = client.get("/v1/info").json()
    assert info["dim"] == DIM and info["ood_calibrated"] is False
    assert info["index"]["dim"] == DIM and info["limits"]["max_images_per_request"] == 8
    assert "api_key" not in json.dumps(info) and API_KEY not in json.dumps(info)
    assert info["index_size"] == info["index"]["size"] and info["backend"] == info["index"]["backend"] == backend_name()
    meta = info["model"]  # the page's target l0: the analytic rate of the model's own RGN target
    assert info["target_l0"] == pytest.approx(expected_l0(meta["target_p"], meta["target_mu"], meta["target_sigma"]))
    assert 0 < info["target_l0"] < 1
    spec = client.get("/openapi.json").json()
    for path in ("/v1/embed", "/v1/search", "/v1/items", "/v1/items/{item_id}", "/v1/ood", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "EmbedJSON" in spec["components"]["schemas"] and "EmbeddingIn" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_web_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset


# ------------------------------------------------------------------------------------------ embed
def test_embed_matches_the_torch_encoder(client, model_path):
    images = fashion_images(5)
    reference = reference_embeddings(model_path, images)
    response = client.post("/v1/embed", files=multipart([png_bytes(img) for img in images]))
    assert response.status_code == 200, response.text
    embeddings = response.json()["embeddings"]
    assert len(embeddings) == 5
    for emb, ref in zip(embeddings, reference, strict=True):
        assert emb["dim"] == DIM and emb["indices"] == sorted(emb["indices"])
        assert all(v > 0 for v in emb["values"])
        assert emb["nnz"] == len(emb["indices"]) and emb["l0"] == pytest.approx(emb["nnz"] / DIM)
        np.testing.assert_allclose(dense_of(emb), ref, rtol=1e-4, atol=1e-4)
        assert emb["ood_score"] is None and emb["is_ood"] is None and emb["dense"] is None


def test_embed_body_is_the_response_model_with_the_runtime_float32s(client, model_path):
    """The body (orjson from numpy arrays, serve/responses.py) validates as the documented EmbedResponse, its
    values parse back to ONNX Runtime's float32s, and the dense vector holds exactly the sparse values."""
    from export.runtime import EmbeddingRuntime
    from serve.schemas import EmbedResponse

    data = fashion_pngs(4, offset=20)
    response = client.post("/v1/embed?dense=true", files=multipart(data))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = EmbedResponse.model_validate_json(response.content)
    runtime = EmbeddingRuntime(str(model_path))
    reference = runtime.run(runtime.preprocess([Image.open(io.BytesIO(d)) for d in data]))
    for emb, ref in zip(body.embeddings, reference, strict=True):
        idx = np.flatnonzero(ref)
        assert emb.indices == idx.tolist() and emb.nnz == idx.size and emb.l0 == idx.size / DIM
        np.testing.assert_allclose(np.float32(emb.values), ref[idx], rtol=1e-6, atol=1e-7)
        dense = np.float32(emb.dense)
        assert np.array_equal(dense[emb.indices], np.float32(emb.values)) and np.count_nonzero(dense) == emb.nnz


def test_embed_json_base64_equals_multipart_and_dense_on_request(client):
    data = fashion_pngs(3, offset=10)
    via_form = client.post("/v1/embed", files=multipart(data)).json()["embeddings"]
    via_json = client.post("/v1/embed", json={"images": [b64(d) for d in data], "dense": True}).json()["embeddings"]
    for a, b in zip(via_form, via_json, strict=True):
        assert a["indices"] == b["indices"]
        np.testing.assert_allclose(a["values"], b["values"], rtol=1e-6)
        np.testing.assert_allclose(b["dense"], dense_of(a), rtol=1e-6)
    # data: URLs (what a browser's FileReader gives) and ?dense=true on multipart
    url = "data:image/png;base64," + b64(data[0])
    assert client.post("/v1/embed", json={"images": [url]}).json()["embeddings"][0]["indices"] == via_form[0]["indices"]
    dense = client.post("/v1/embed?dense=true", files=multipart(data[:1])).json()["embeddings"][0]["dense"]
    assert len(dense) == DIM


def test_embed_real_colour_files_of_varied_sizes(client):
    files = cifar_files()[:4]
    response = client.post(
        "/v1/embed",
        files=[("files", (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in files],
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["embeddings"]) == len(files)


def test_images_in_every_common_mode_and_format(client):
    """Palette, alpha, CMYK, 16-bit, greyscale+alpha; PNG, JPEG, WebP, BMP, GIF, TIFF: all embed (and index with
    a thumbnail), converted to the model's input mode exactly as training's evaluation transform does."""
    base = Image.open(cifar_files()[0]).convert("RGB")
    variants = {
        "P.png": png_bytes(base.convert("P")),
        "RGBA.png": png_bytes(base.convert("RGBA")),
        "LA.png": png_bytes(base.convert("LA")),
        "I16.png": png_bytes(base.convert("L").convert("I;16")),
        "CMYK.jpg": png_bytes(base.convert("CMYK"), fmt="JPEG"),
        "RGB.webp": png_bytes(base, fmt="WEBP"),
        "RGB.bmp": png_bytes(base, fmt="BMP"),
        "P.gif": png_bytes(base.convert("P"), fmt="GIF"),
        "RGB.tiff": png_bytes(base, fmt="TIFF"),
    }
    files = [("files", (name, data, "application/octet-stream")) for name, data in variants.items()]
    for part in (files[:8], files[8:]):  # this app takes at most 8 images per request
        embedded = client.post("/v1/embed", files=part)
        assert embedded.status_code == 200, embedded.text
        assert len(embedded.json()["embeddings"]) == len(part)
    ids = list(range(7000, 7000 + len(variants)))
    put = client.put("/v1/items", headers=AUTH, files=files[:8], data={"ids": json.dumps(ids[:8])})
    assert put.status_code == 200, put.text


# ------------------------------------------------------------------------------------------ items + search
def _one_hot_items(ids, dims, payload_key="n"):
    return [
        {
            "id": i,
            "embedding": {"indices": [d, (d + 1) % DIM], "values": [1.0 + i / 1000, 0.25]},
            "payload": {payload_key: i},
        }
        for i, d in zip(ids, dims, strict=True)
    ]


def test_items_put_get_replace_delete(client):
    items = _one_hot_items([101, 102, 103], [3, 4, 5])
    assert_error(client.put("/v1/items", json={"items": items}), 401, "unauthorized")
    response = client.put("/v1/items", json={"items": items}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ids"] == [101, 102, 103] and body["created"] == 3 and body["replaced"] == 0
    item = client.get("/v1/items/102").json()
    assert item["payload"] == {"n": 102}
    # replace: same id, new payload and vector
    again = client.put(
        "/v1/items",
        headers=AUTH,
        json={
            "items": [
                {"id": 102, "embedding": {"dense": [0.0] * 10 + [2.0] + [0.0] * (DIM - 11)}, "payload": {"n": "new"}}
            ]
        },
    )
    assert again.json()["created"] == 0 and again.json()["replaced"] == 1
    item = client.get("/v1/items/102").json()
    assert item["payload"] == {"n": "new"}
    if item["embedding"] is not None:
        assert item["embedding"]["indices"] == [10] and item["embedding"]["values"] == [2.0]
    size_before = again.json()["index_size"]
    deleted = client.delete("/v1/items/102", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json() == {"id": 102, "deleted": True, "index_size": size_before - 1}
    assert_error(client.get("/v1/items/102"), 404, "unknown_id")
    assert_error(client.delete("/v1/items/102", headers=AUTH), 404, "unknown_id")
    assert_error(client.delete("/v1/items/101"), 401)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_search_ranks_like_brute_force(model_path, tmp_path, metric):
    rng = np.random.default_rng(7)
    ids = list(range(500, 560))
    vectors = rng.random((len(ids), DIM)).astype(np.float32)
    vectors[vectors < 0.7] = 0
    items = [
        {"id": i, "embedding": {"dense": v.tolist()}, "payload": {"tag": f"v{i}"}}
        for i, v in zip(ids, vectors, strict=True)
    ]
    with TestClient(create_app(make_settings(model_path, tmp_path, index_metric=metric))) as c:
        assert c.put("/v1/items", json={"items": items}, headers=AUTH).status_code == 200
        assert c.get("/v1/info").json()["index"]["metric"] == metric
        for _ in range(5):
            query = rng.random(DIM).astype(np.float32)
            query[query < 0.6] = 0
            nz = np.flatnonzero(query)
            response = c.post(
                "/v1/search", json={"embedding": {"indices": nz.tolist(), "values": query[nz].tolist()}, "k": 7}
            )
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            stored, q = vectors.astype(np.float64), query.astype(np.float64)
            if metric == "cosine":
                stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
                q = q / np.linalg.norm(q)
            reference = stored @ q
            order = np.argsort(-reference)[:7]
            assert [h["id"] for h in hits] == [ids[i] for i in order]
            np.testing.assert_allclose([h["score"] for h in hits], reference[order], rtol=1e-5)
            assert [h["payload"] for h in hits] == [{"tag": f"v{ids[i]}"} for i in order]


def test_search_by_image_finds_the_same_image_first(client):
    data = fashion_pngs(6, offset=200)
    ids = list(range(900, 906))
    response = client.put(
        "/v1/items",
        headers=AUTH,
        files=multipart(data),
        data={"ids": json.dumps(ids), "payloads": json.dumps([{"label": f"img{i}"} for i in ids])},
    )
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 6
    for i, img in zip(ids, data, strict=True):
        embedded = client.post("/v1/embed", files=multipart([img])).json()["embeddings"][0]
        hits = client.post(
            "/v1/search", json={"embedding": {"indices": embedded["indices"], "values": embedded["values"]}, "k": 50}
        ).json()["results"]
        assert hits[0]["id"] == i  # cosine (the default metric): an image's own item comes first
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    found = client.post(
        "/v1/search", files={"file": ("q.png", data[2], "image/png")}, data={"k": "3", "thumbnails": "true"}
    )
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["query"]["dim"] == DIM
    assert body["results"][0]["id"] == 902
    thumb = body["results"][0]["thumbnail"]
    img = Image.open(io.BytesIO(base64.b64decode(thumb)))
    assert img.format == "PNG" and max(img.size) <= 48
    item = client.get("/v1/items/903").json()
    assert item["payload"] == {"label": "img903"} and item["thumbnail"]


def test_search_with_k_larger_than_index_returns_what_exists(model_path, tmp_path):
    app = create_app(make_settings(model_path, tmp_path, api_key=None))
    with TestClient(app) as c:
        empty = c.post("/v1/search", json={"embedding": {"indices": [0], "values": [1.0]}, "k": 5})
        assert empty.status_code == 200 and empty.json()["results"] == []
        c.put("/v1/items", json={"items": _one_hot_items([1, 2], [0, 1])})
        hits = c.post("/v1/search", json={"embedding": {"indices": [0], "values": [1.0]}, "k": 50}).json()["results"]
        assert [h["id"] for h in hits] == [1, 2]


def test_serves_an_index_built_offline(model_path, tmp_path):
    """An index written by the index package (as `lpjepa index build` does) is served as is, payloads included,
    and writes through the server land in the same directory format."""
    from export.runtime import EmbeddingRuntime
    from index.factory import create_index, load_index

    images = fashion_images(10, offset=700)
    rt = EmbeddingRuntime(str(model_path))
    built = create_index(backend="csr", dim=DIM, metric="cosine")
    payloads = [{"label": i % 3, "source": "fashion-mnist:test", "row": 700 + i} for i in range(9)] + ["just text"]
    built.add(np.arange(10, dtype=np.int64) + 40, rt.embed(images), payloads)
    built.save(tmp_path / "built")
    app = create_app(make_settings(model_path, tmp_path, index_dir=tmp_path / "built", api_key=None))
    with TestClient(app) as c:
        assert c.get("/v1/info").json()["index"]["size"] == 10
        hits = c.post("/v1/search", files={"file": ("q.png", png_bytes(images[9]), "image/png")}).json()["results"]
        assert hits[0]["id"] == 49 and hits[0]["payload"] == "just text"
        assert c.get("/v1/items/41").json()["payload"] == {"label": 1, "source": "fashion-mnist:test", "row": 701}
        emb = c.get("/v1/items/41").json()["embedding"]
        np.testing.assert_allclose(dense_of(emb), rt.embed(images[1:2]).toarray()[0], rtol=1e-5, atol=1e-6)
        assert c.delete("/v1/items/40").status_code == 200
    reloaded = load_index(tmp_path / "built")  # the clean shutdown snapshotted into the same directory
    assert len(reloaded) == 9 and 40 not in reloaded and reloaded.payload(49) == "just text"


# ------------------------------------------------------------------------------------------ error paths
def test_bad_images_are_4xx_with_a_message(client):
    good = fashion_pngs(1)[0]
    assert_error(
        client.post("/v1/embed", files=multipart([b"definitely not an image"])), 415, "unsupported_image_format"
    )
    assert_error(client.post("/v1/embed", files=multipart([good[: len(good) // 2]])), 422, "corrupt_image")
    assert_error(client.post("/v1/embed", files=multipart([b""])), 422)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert client.post("/v1/embed", files=multipart([eps])).status_code in (415, 422)
    assert_error(client.post("/v1/embed", files=[("files", ("a.txt", good, "text/plain"))]), 415)
    big = png_bytes(Image.new("L", (1100, 1000)))  # 1.1 MP > the 1 MP limit of this app
    err = assert_error(client.post("/v1/embed", files=multipart([big])), 413, "image_too_large")
    assert "1100x1000" in err["message"]
    # A PNG header that declares a huge image: refused from the header, before any pixel is decoded.
    bomb = png_declaring_size(20000, 20000)
    assert_error(client.post("/v1/embed", files=multipart([bomb])), 413, "image_too_large")
    assert_error(client.post("/v1/embed", json={"images": ["!!!not base64!!!"]}), 422, "invalid_base64")
    gif = png_bytes(Image.new("L", (10, 10)), fmt="ICO")
    assert_error(client.post("/v1/embed", files=multipart([gif])), 415, "unsupported_image_format")


def test_bad_requests_are_4xx_with_a_message(client):
    good = fashion_pngs(1)[0]
    post = client.post
    assert_error(
        post("/v1/embed", content=b'{"images": [', headers={"content-type": "application/json"}), 400, "malformed_json"
    )
    assert_error(post("/v1/embed", content=b"", headers={"content-type": "application/json"}), 400)
    assert_error(post("/v1/embed", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    assert_error(post("/v1/embed", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert_error(post("/v1/embed", content=b"hello"), 415)
    assert_error(post("/v1/embed", json={"imgs": []}), 422, "invalid_request")
    assert_error(post("/v1/embed", json=["not", "an", "object"]), 422)
    assert_error(post("/v1/embed", json={"images": []}), 422, "missing_images")
    assert_error(post("/v1/embed", files={"other": ("a.png", good, "image/png")}), 422, "missing_images")
    assert_error(post("/v1/embed", files=multipart([good] * 9)), 413, "too_many_images")
    assert_error(post("/v1/embed", json={"images": [b64(good)] * 9}), 413, "too_many_images")
    assert_error(
        post("/v1/embed", content=b"x" * (3 * 1024 * 1024), headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )
    chunked = iter([b"x" * (1024 * 1024)] * 3)  # no Content-Length: counted as it streams in
    assert_error(
        post("/v1/embed", content=chunked, headers={"content-type": "application/json"}), 413, "payload_too_large"
    )
    assert_error(post("/v1/embed", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}), 400)
    assert_error(client.get("/v1/nowhere"), 404)
    assert_error(client.get("/v1/embed"), 405)


def test_bad_embeddings_and_search_parameters(client):
    def search(body):
        return client.post("/v1/search", json=body)

    assert_error(search({"embedding": {"indices": [1, DIM], "values": [1, 1]}}), 422, "wrong_dimension")
    assert_error(search({"embedding": {"indices": [-1], "values": [1]}}), 422, "wrong_dimension")
    assert_error(search({"embedding": {"dense": [0.5] * (DIM - 1)}}), 422, "wrong_dimension")
    assert_error(search({"embedding": {"indices": [1], "values": [1], "dim": 128}}), 422, "wrong_dimension")
    assert_error(search({"embedding": {"indices": [1], "values": [-0.5]}}), 422, "invalid_embedding")
    assert_error(search({"embedding": {"indices": [1, 1], "values": [1, 2]}}), 422, "invalid_embedding")
    assert_error(search({"embedding": {"indices": [1], "values": [1e300]}}), 422, "invalid_embedding")
    assert_error(search({"embedding": {"indices": [1, 2], "values": [1]}}), 422)
    assert_error(search({"embedding": {"indices": [1]}}), 422)
    assert_error(search({"embedding": {"dense": [1] * DIM, "indices": [1], "values": [1]}}), 422)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"embedding": {"indices": [1], "values": [' + constant + b"]}}"
        assert_error(
            client.post("/v1/search", content=raw, headers={"content-type": "application/json"}), 422, "invalid_number"
        )
    assert_error(search({"embedding": {"indices": [1], "values": [1]}, "k": 0}), 422)
    assert_error(search({"embedding": {"indices": [1], "values": [1]}, "k": 51}), 422, "invalid_k")
    assert_error(search({"embedding": {"indices": [1], "values": [1]}, "k": "ten"}), 422)
    assert_error(search({}), 422)
    assert_error(search({"embedding": {"indices": [1], "values": [1]}, "image": "abc"}), 422)
    good = fashion_pngs(2)
    assert_error(client.post("/v1/search", files=multipart(good, name="file")), 422)
    assert_error(client.post("/v1/search", files=multipart(good[:1], name="file"), data={"k": "x"}), 422)


def test_bad_item_writes(client):
    put = lambda body: client.put("/v1/items", json=body, headers=AUTH)  # noqa: E731
    emb = {"indices": [1], "values": [1.0]}
    assert_error(put({"items": []}), 422)
    assert_error(put({"items": [{"id": 1, "embedding": emb}, {"id": 1, "embedding": emb}]}), 422, "duplicate_ids")
    assert_error(put({"items": [{"id": -3, "embedding": emb}]}), 422)
    assert_error(put({"items": [{"id": 2**63, "embedding": emb}]}), 422)
    assert_error(put({"items": [{"id": 1}]}), 422)
    assert_error(put({"items": [{"id": 1, "embedding": emb, "payload": {"x": "y" * 600}}]}), 413, "payload_too_large")
    assert_error(put({"items": [{"id": 1, "embedding": emb, "payload": [1, 2]}]}), 422)
    assert_error(put({"items": [{"id": 1, "embedding": {"indices": [99], "values": [1.0]}}]}), 422)
    good = fashion_pngs(2)
    form = lambda data: client.put("/v1/items", headers=AUTH, files=multipart(good), data=data)  # noqa: E731
    assert_error(form({}), 422, "missing_ids")
    assert_error(form({"ids": "[1]"}), 422)
    assert_error(form({"ids": "1,x"}), 422, "invalid_id")
    assert_error(form({"ids": "[1, 2]", "payloads": "{not json"}), 422, "invalid_payload")
    assert_error(form({"ids": "[1, 2]", "payloads": "[{}]"}), 422, "invalid_payload")
    assert_error(client.get("/v1/items/notanumber"), 422)
    assert_error(client.get("/v1/items/-5"), 422)
    assert_error(client.get("/v1/items/99999999"), 404, "unknown_id")
    # nothing above may have been written
    assert client.get("/v1/items/1").status_code == 404


def test_ood_without_calibration_is_a_clear_409(client):
    assert_error(client.post("/v1/ood", files=multipart(fashion_pngs(1))), 409, "ood_uncalibrated")


def test_no_index_configured(model_path, tmp_path):
    app = create_app(make_settings(model_path, tmp_path, index_dir=None, api_key=None))
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        info = c.get("/v1/info").json()
        assert info["index"] is None and info["index_size"] is None and info["backend"] is None
        assert_error(c.post("/v1/search", json={"embedding": {"indices": [0], "values": [1.0]}}), 409, "no_index")
        assert_error(c.get("/v1/items/1"), 409, "no_index")
        assert c.post("/v1/embed", files=multipart(fashion_pngs(1))).status_code == 200


# ------------------------------------------------------------------------------------------ auth
def test_auth_reads_flag_and_open_ops_endpoints(model_path, tmp_path):
    app = create_app(make_settings(model_path, tmp_path, auth_reads=True))
    with TestClient(app) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert c.get(path).status_code == 200, path
        missing = c.get("/v1/info")
        assert_error(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v1/info", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/info", headers={"Authorization": f"Basic {API_KEY}"}), 401)
        assert_error(c.post("/v1/embed", files=multipart(fashion_pngs(1))), 401)
        assert c.get("/v1/info", headers=AUTH).status_code == 200
        assert c.post("/v1/embed", files=multipart(fashion_pngs(1)), headers=AUTH).status_code == 200


def test_api_key_from_environment(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LPJEPA_API_KEY", "from-env")
    settings = ServeSettings.with_env(model_path=model_path, index_dir=tmp_path / "i")
    assert settings.api_key == "from-env"
    with TestClient(create_app(settings)) as c:
        emb = {"indices": [1], "values": [1.0]}
        assert_error(c.put("/v1/items", json={"items": [{"id": 1, "embedding": emb}]}), 401)
        ok = c.put(
            "/v1/items", json={"items": [{"id": 1, "embedding": emb}]}, headers={"Authorization": "Bearer from-env"}
        )
        assert ok.status_code == 200


# ------------------------------------------------------------------------------------------ calibrated model
def test_ood_scores_match_the_scorer(calibrated_model, tmp_path):
    from export.runtime import EmbeddingRuntime
    from ood.suite import ScoreSuite

    calibrated, cal = calibrated_model
    images = fashion_images(4, offset=50)
    colour = [Image.open(p).convert("RGB") for p in cifar_files()[:3]]
    runtime = EmbeddingRuntime(str(calibrated))
    codes, feats = runtime.embed_with_features(images + colour)
    expected = ScoreSuite.from_calibration(cal).score(codes, feats)
    served, threshold = cal["served"], cal["scores"][cal["served"]]["threshold"]
    app = create_app(make_settings(calibrated, tmp_path, index_dir=None))
    with TestClient(app) as c:
        info = c.get("/v1/info").json()
        assert info["ood_calibrated"] is True and "ood_calibration" not in info["model"]
        assert info["ood"]["threshold"] == pytest.approx(threshold) and info["ood"]["tpr"] == 0.95
        assert info["ood"]["served"] == served
        data = [png_bytes(img) for img in images + colour]
        ood = c.post("/v1/ood", files=multipart(data))
        assert ood.status_code == 200, ood.text
        body = ood.json()
        assert body["threshold"] == pytest.approx(threshold) and body["score_name"] == served
        assert {r["score_name"] for r in body["results"]} == {served}
        np.testing.assert_allclose([r["score"] for r in body["results"]], expected.score, rtol=1e-5, atol=1e-6)
        assert [r["is_ood"] for r in body["results"]] == expected.is_ood.tolist()
        np.testing.assert_allclose([r["l0"] for r in body["results"]], expected.l0, rtol=1e-6)
        embedded = c.post("/v1/embed", json={"images": [b64(d) for d in data]}).json()["embeddings"]
        np.testing.assert_allclose([e["ood_score"] for e in embedded], expected.score, rtol=1e-5, atol=1e-6)
        assert [e["is_ood"] for e in embedded] == expected.is_ood.tolist()
        assert {e["ood_score_name"] for e in embedded} == {served}
        assert [e["ood_threshold"] for e in embedded] == pytest.approx([threshold] * len(data))
        metrics = c.get("/metrics").text
        assert f"lpjepa_ood_flagged_total {2.0 * int(expected.is_ood.sum())}" in metrics


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_expose_requests_batches_queue_index_and_l0(model_path, tmp_path):
    app = create_app(make_settings(model_path, tmp_path, api_key=None))
    with TestClient(app) as c:
        c.post("/v1/embed", files=multipart(fashion_pngs(3)))
        c.post("/v1/embed", json={"images": []})
        c.put("/v1/items", json={"items": _one_hot_items([1, 2, 3, 4], [0, 1, 2, 3])})
        c.get("/v1/items/12345")
        assert gc.get_freeze_count() > 10_000  # what start-up loaded is out of the collector's generations
        gc.collect()
        text = c.get("/metrics").text
    assert app.state.serve.metrics._on_gc not in gc.callbacks  # the pause hook goes with the app
    assert float(re.search(r'^lpjepa_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M).group(1)) >= 1
    assert 'lpjepa_http_requests_total{method="POST",route="/v1/embed",status="200"} 1.0' in text
    assert 'lpjepa_http_requests_total{method="POST",route="/v1/embed",status="422"} 1.0' in text
    assert 'lpjepa_http_requests_total{method="GET",route="/v1/items/{item_id}",status="404"} 1.0' in text
    assert 'lpjepa_http_request_duration_seconds_count{method="PUT",route="/v1/items",status="200"} 1.0' in text
    assert "lpjepa_model_batch_size_count 1.0" in text and "lpjepa_model_batch_size_sum 3.0" in text
    assert "lpjepa_embedding_l0_fraction_count 3.0" in text
    assert "lpjepa_model_queue_images 0.0" in text
    assert "lpjepa_index_items 4.0" in text


# ------------------------------------------------------------------------------------------ batching + overload
async def _with_app(app, fn):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await fn(c)


def _batch_stats(text: str) -> tuple[float, float]:
    total = float(re.search(r"^lpjepa_model_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^lpjepa_model_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_are_batched_and_answered_correctly(model_path, tmp_path, batching):
    data = fashion_pngs(12, offset=300)
    app = create_app(make_settings(model_path, tmp_path, index_dir=None, batching=batching, max_wait_ms=100.0))

    async def scenario(c):
        alone = [(await c.post("/v1/embed", files=multipart([d]))).json()["embeddings"][0] for d in data[:2]]
        before = _batch_stats((await c.get("/metrics")).text)
        responses = await asyncio.gather(*(c.post("/v1/embed", files=multipart([d])) for d in data))
        after = _batch_stats((await c.get("/metrics")).text)
        return alone, responses, before, after

    alone, responses, before, after = asyncio.run(_with_app(app, scenario))
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["embeddings"][0] for r in responses]
    for single, batched in zip(alone, got[:2], strict=True):  # batching must not change any result
        assert single["indices"] == batched["indices"]
        np.testing.assert_allclose(single["values"], batched["values"], rtol=1e-4, atol=1e-5)
    images, calls = after[0] - before[0], after[1] - before[1]
    assert images == 12
    if batching:
        assert calls < 12, f"12 concurrent requests took {calls} model calls"
    else:
        assert calls == 12


def test_a_lone_request_is_not_held_back_by_max_wait(model_path, tmp_path):
    """The batcher waits for company only while other requests are being decoded, so max_wait costs a lone
    request nothing."""
    import time

    data = fashion_pngs(1)[0]
    app = create_app(make_settings(model_path, tmp_path, index_dir=None, max_wait_ms=5000.0))

    async def scenario(c):
        await c.post("/v1/embed", files=multipart([data]))  # warm-up
        t0 = time.perf_counter()
        r = await c.post("/v1/embed", files=multipart([data]))
        return r, time.perf_counter() - t0

    response, seconds = asyncio.run(_with_app(app, scenario))
    assert response.status_code == 200
    assert seconds < 2.5, f"a single request took {seconds:.2f} s with max_wait 5 s"


def test_overload_is_503_with_retry_after_never_a_hang(model_path, tmp_path):
    data = fashion_pngs(1)[0]
    app = create_app(make_settings(model_path, tmp_path, index_dir=None, max_queue=2, max_wait_ms=300.0))

    async def scenario(c):
        return await asyncio.wait_for(
            asyncio.gather(*(c.post("/v1/embed", files=multipart([data])) for _ in range(10))), 30
        )

    responses = asyncio.run(_with_app(app, scenario))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert_error(refused, 503, "overloaded")


def test_inflight_limit_refuses_excess_requests(model_path, tmp_path):
    data = fashion_pngs(1)[0]
    app = create_app(make_settings(model_path, tmp_path, index_dir=None, max_inflight=2, max_wait_ms=300.0))

    async def scenario(c):
        responses = await asyncio.gather(*(c.post("/v1/embed", files=multipart([data])) for _ in range(6)))
        health = await c.get("/healthz")  # ops endpoints stay reachable under API overload
        return responses, health

    responses, health = asyncio.run(_with_app(app, scenario))
    codes = [r.status_code for r in responses]
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert health.status_code == 200


# ------------------------------------------------------------------------------------------ consistency
def test_concurrent_writes_and_searches_stay_consistent(model_path, tmp_path):
    """Writers add items with a distinctive code; a search for that code right after the ack must find it, and
    no search may ever see an id without its own payload (a half-applied write)."""
    app = create_app(make_settings(model_path, tmp_path, api_key=None, compact_every=7))
    n_writers, per_writer = 4, 12

    async def writer(c, w):
        for j in range(per_writer):
            item_id = w * 1000 + j
            dim = (w * per_writer + j) % DIM
            emb = {"indices": [dim], "values": [10.0 + item_id / 1e4]}
            r = await c.put(
                "/v1/items", json={"items": [{"id": item_id, "embedding": emb, "payload": {"id": item_id}}]}
            )
            assert r.status_code == 200, r.text
            hits = (await c.post("/v1/search", json={"embedding": emb, "k": 50})).json()["results"]
            assert item_id in [h["id"] for h in hits], (item_id, hits)

    async def searcher(c, stop):
        seen = 0
        rng = np.random.default_rng(0)
        while not stop.is_set():
            q = rng.random(DIM)
            r = await c.post("/v1/search", json={"embedding": {"dense": q.tolist()}, "k": 20})
            assert r.status_code == 200
            for h in r.json()["results"]:
                assert h["payload"] == {"id": h["id"]}, h
                seen += 1
            await asyncio.sleep(0)
        return seen

    async def scenario(c):
        stop = asyncio.Event()
        searchers = [asyncio.create_task(searcher(c, stop)) for _ in range(3)]
        await asyncio.gather(*(writer(c, w) for w in range(n_writers)))
        stop.set()
        seen = await asyncio.gather(*searchers)
        size = (await c.get("/v1/info")).json()["index"]["size"]
        return seen, size

    seen, size = asyncio.run(_with_app(app, scenario))
    assert size == n_writers * per_writer
    assert sum(seen) > 0
    # After the lifespan closed (snapshot), a fresh app over the same directory has every item.
    app2 = create_app(make_settings(model_path, tmp_path, api_key=None))
    with TestClient(app2) as c:
        assert c.get("/v1/info").json()["index"]["size"] == n_writers * per_writer
        for w in range(n_writers):
            for j in range(per_writer):
                assert c.get(f"/v1/items/{w * 1000 + j}").json()["payload"] == {"id": w * 1000 + j}
