"""Regression tests for the defects of issue 14, each sending the exact bad input that used to be accepted (or that
answered 500) and then checking that what was stored before is intact and still served.

1 poisoning payloads (lone surrogate, deep nesting)   2 deeply nested bodies   3 integers beyond int64
4 memory amplification by small PNGs of huge images (see test_serve_process_limits.py for the RSS bound)
5 silent loss after log corruption (see test_serve_durability.py and test_serve_repair.py)
6 values outside float32 read back as null; empty/all-zero queries   7 item embedding order vs the contract
8 lax integer/boolean coercion   9 docs vs code, auth declared where it is not required
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import AUTH, DIM, assert_error, b64, fashion_pngs, multipart, serve_settings

from serve.app import create_app

ROOT = Path(__file__).resolve().parents[1]


BASELINE = {
    1: ({"indices": [0, 3, 9], "values": [1.0, 2.0, 0.5]}, {"name": "one", "tags": ["a", "é"]}),
    2: ({"indices": [5, 9, 63], "values": [0.25, 4.0, 1.5]}, {"name": "two", "nested": {"x": [1, 2.5]}}),
}


@pytest.fixture(scope="module")
def runtime(model_path, tmp_path_factory):
    from serve.embedding import load_runtime

    return load_runtime(serve_settings(model_path, tmp_path_factory.mktemp("rt")))


@pytest.fixture
def client(model_path, runtime, tmp_path):
    """A fresh index per test (so each defect is shown on its own), holding the baseline items."""
    settings = serve_settings(model_path, tmp_path, max_payload_bytes=64 * 1024)
    with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as c:
        items = [{"id": i, "embedding": emb, "payload": p} for i, (emb, p) in BASELINE.items()]
        assert c.put("/v1/items", headers=AUTH, json={"items": items}).status_code == 200
        yield c


def assert_intact(client) -> None:
    """The items stored before the bad request read back exactly, and a search still finds them."""
    for item_id, (emb, payload) in BASELINE.items():
        got = client.get(f"/v1/items/{item_id}")
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["payload"] == payload
        got = dict(zip(body["embedding"]["indices"], body["embedding"]["values"], strict=True))  # order: test 7
        assert sorted(got) == emb["indices"]
        np.testing.assert_allclose([got[i] for i in emb["indices"]], emb["values"], rtol=1e-6)
        hits = client.post("/v1/search", json={"embedding": emb, "k": 2})
        assert hits.status_code == 200 and hits.json()["results"][0]["id"] == item_id, hits.text
    size = client.get("/v1/info").json()["index"]["size"]
    assert size == len(BASELINE), size


def put_raw(client, text: str):
    return client.put("/v1/items", headers={**AUTH, "content-type": "application/json"}, content=text.encode())


def item_json(item_id: int | str, payload_text: str = "null", embedding: str | None = None) -> str:
    emb = embedding or '{"indices": [1, 2], "values": [1.0, 1.0]}'
    return f'{{"items": [{{"id": {item_id}, "embedding": {emb}, "payload": {payload_text}}}]}}'


# ------------------------------------------------------------------------------------------ 1: poisoning
@pytest.mark.parametrize(
    "payload_text",
    [
        '{"s": "\\ud800"}',  # a lone high surrogate
        '{"s": "ok", "t": ["\\udfff"]}',  # a lone low surrogate, deeper
        '{"\\ud83d": 1}',  # in a key
        '{"a": ' * 300 + "1" + "}" * 300,  # 300 levels: deeper than the body bound
        '{"a": ' * 33 + "1" + "}" * 33,  # 33 levels: within the body bound, deeper than a payload may be
    ],
    ids=["lone-surrogate", "lone-low-surrogate", "surrogate-key", "depth-300", "depth-33"],
)
def test_poisoning_payloads_are_refused(client, payload_text):
    response = put_raw(client, item_json(7, payload_text))
    error = assert_error(response, 422)
    assert "surrogate" in error["message"] or "deep" in error["message"], error
    assert client.get("/v1/items/7").status_code == 404
    assert_intact(client)


def test_a_payload_32_levels_deep_is_stored_and_reads_back(client):
    payload = 1
    for _ in range(32):
        payload = {"a": payload}
    response = client.put(
        "/v1/items", headers=AUTH, json={"items": [{"id": 8, "embedding": BASELINE[1][0], "payload": payload}]}
    )
    assert response.status_code == 200, response.text
    assert client.get("/v1/items/8").json()["payload"] == payload
    assert client.delete("/v1/items/8", headers=AUTH).status_code == 200
    assert_intact(client)


def test_poisoning_through_multipart_payloads_is_refused(client):
    png = fashion_pngs(1)[0]
    for text in ('[{"s": "\\ud800"}]', "[" + '{"a": ' * 40 + "1" + "}" * 40 + "]"):
        response = client.put("/v1/items", headers=AUTH, files=multipart([png]), data={"ids": "[9]", "payloads": text})
        assert_error(response, 422, "invalid_payload")
    assert client.get("/v1/items/9").status_code == 404
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 2: deep bodies
@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("post", "/v1/embed", {}),
        ("post", "/v1/search", {}),
        ("put", "/v1/items", AUTH),
    ],
)
def test_a_body_nested_100000_deep_is_refused_without_recursion(client, method, path, headers):
    body = ("[" * 100_000 + "]" * 100_000).encode()
    response = client.request(method, path, content=body, headers={**headers, "content-type": "application/json"})
    assert_error(response, 422, "too_deep")
    deep_object = ('{"a":' * 50_000 + "1" + "}" * 50_000).encode()
    response = client.request(
        method, path, content=deep_object, headers={**headers, "content-type": "application/json"}
    )
    assert_error(response, 422, "too_deep")
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 3: huge integers
HUGE = 10**30


@pytest.mark.parametrize(
    "request_args",
    [
        ("put", "/v1/items", {"json": {"items": [{"id": HUGE, "embedding": {"indices": [1], "values": [1.0]}}]}}),
        ("put", "/v1/items", {"json": {"items": [{"id": 3, "embedding": {"indices": [HUGE], "values": [1.0]}}]}}),
        ("post", "/v1/search", {"json": {"embedding": {"indices": [HUGE], "values": [1.0]}}}),
        ("post", "/v1/search", {"json": {"embedding": {"indices": [1], "values": [1.0], "dim": HUGE}}}),
        ("post", "/v1/search", {"json": {"embedding": {"indices": [1], "values": [1.0]}, "k": HUGE}}),
        ("post", f"/v1/search?k={HUGE}", {"json": {"embedding": {"indices": [1], "values": [1.0]}}}),
        ("get", f"/v1/items/{HUGE}", {}),
        ("delete", f"/v1/items/{HUGE}", {}),
        ("get", f"/v1/items/{-HUGE}", {}),
        ("put", "/v1/items", {"files": "one", "data": {"ids": f"[{HUGE}]"}}),
        ("put", "/v1/items", {"files": "one", "data": {"ids": str(HUGE)}}),
        ("post", "/v1/search", {"files": "query", "data": {"k": str(HUGE)}}),
    ],
    ids=lambda a: f"{a[0]} {a[1][:20]} {sorted(a[2].get('json', a[2].get('data', {})))}",
)
def test_integers_beyond_int64_are_422(client, request_args):
    method, path, kwargs = request_args
    kwargs = dict(kwargs)
    png = fashion_pngs(1)[0]
    if kwargs.get("files") == "one":
        kwargs["files"] = multipart([png])
    elif kwargs.get("files") == "query":
        kwargs["files"] = multipart([png], name="file")
    response = client.request(method, path, headers=AUTH, **kwargs)
    assert_error(response, 422)
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 6: float range, empty
@pytest.mark.parametrize(
    "embedding",
    [
        {"indices": [1, 2], "values": [3e38, 3e38]},  # norm beyond float32: used to read back as null
        {"indices": [1], "values": [3e38]},
        {"indices": [1], "values": [1e39]},  # beyond float32 itself
        {"indices": [1, 2], "values": [1.0, 1e-50]},  # would be stored as 0 (the dimension silently lost)
        {"dense": [1e30] * DIM},
    ],
)
def test_vector_values_outside_float32_are_refused(client, embedding):
    assert_error(client.put("/v1/items", headers=AUTH, json={"items": [{"id": 11, "embedding": embedding}]}), 422)
    assert_error(client.post("/v1/search", json={"embedding": embedding}), 422)
    assert client.get("/v1/items/11").status_code == 404
    assert_intact(client)


def test_large_values_within_range_read_back_as_numbers(client):
    emb = {"indices": [4, 7], "values": [1e18, 3.5e18]}
    assert client.put("/v1/items", headers=AUTH, json={"items": [{"id": 12, "embedding": emb}]}).status_code == 200
    got = client.get("/v1/items/12").json()["embedding"]
    assert got["indices"] == [4, 7]
    np.testing.assert_allclose(got["values"], np.float32(emb["values"]), rtol=1e-6)
    hits = client.post("/v1/search", json={"embedding": emb, "k": 3}).json()["results"]
    assert hits[0]["id"] == 12 and all(isinstance(h["score"], float) for h in hits)
    assert client.delete("/v1/items/12", headers=AUTH).status_code == 200
    assert_intact(client)


@pytest.mark.parametrize(
    "embedding",
    [{"indices": [], "values": []}, {"indices": [3], "values": [0.0]}, {"dense": [0.0] * DIM}],
    ids=["empty", "explicit-zero", "dense-zero"],
)
def test_empty_or_all_zero_queries_are_422(client, embedding):
    assert_error(client.post("/v1/search", json={"embedding": embedding, "k": 2}), 422, "empty_query")
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 7: order
def test_item_embeddings_come_back_ascending_as_documented(client):
    spec = client.get("/openapi.json").json()
    assert "ascending" in spec["components"]["schemas"]["EmbeddingOut"]["properties"]["indices"]["description"]
    emb = {"indices": [60, 2, 31, 7], "values": [1.0, 2.0, 3.0, 4.0]}
    assert client.put("/v1/items", headers=AUTH, json={"items": [{"id": 13, "embedding": emb}]}).status_code == 200
    got = client.get("/v1/items/13").json()["embedding"]
    assert got["indices"] == [2, 7, 31, 60]
    np.testing.assert_allclose(got["values"], [2.0, 4.0, 3.0, 1.0], rtol=1e-6)
    embedded = client.post("/v1/embed", json={"images": [b64(fashion_pngs(1)[0])]}).json()["embeddings"][0]
    assert embedded["indices"] == sorted(embedded["indices"])
    assert client.delete("/v1/items/13", headers=AUTH).status_code == 200
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 8: lax coercion
@pytest.mark.parametrize("bad_id", ['"12"', '"١٢"', "true", "[true]", "12.0", '"0x0c"'])
def test_ids_are_not_coerced(client, bad_id):
    assert_error(put_raw(client, item_json(bad_id)), 422)
    assert client.get("/v1/items/12").status_code == 404 and client.get("/v1/items/1").json()["payload"]
    assert_intact(client)


@pytest.mark.parametrize("bad_k", ["true", '"5"', "2.0", "[2]"])
def test_k_is_not_coerced(client, bad_k):
    body = f'{{"embedding": {{"indices": [1], "values": [1.0]}}, "k": {bad_k}}}'
    response = client.post("/v1/search", content=body.encode(), headers={"content-type": "application/json"})
    assert_error(response, 422)
    assert_intact(client)


@pytest.mark.parametrize("form", [{"ids": "١٢"}, {"ids": "[true]"}, {"ids": " 1_2"}, {"ids": '["12"]'}])
def test_multipart_ids_are_not_coerced(client, form):
    assert_error(client.put("/v1/items", headers=AUTH, files=multipart(fashion_pngs(1)), data=form), 422)
    assert client.get("/v1/items/12").status_code == 404
    assert_intact(client)


@pytest.mark.parametrize("k", ["true", "١٢", "1_0", " 3"])
def test_form_and_query_k_are_not_coerced(client, k):
    png = fashion_pngs(1)[0]
    assert_error(client.post("/v1/search", files=multipart([png], name="file"), data={"k": k}), 422)
    response = client.post(f"/v1/search?k={k}", json={"embedding": {"indices": [1], "values": [1.0]}})
    assert_error(response, 422)
    assert_intact(client)


def test_boolean_and_string_fields_are_strict(client):
    emb = {"indices": [1], "values": [1.0]}
    assert_error(client.post("/v1/search", json={"embedding": emb, "thumbnails": "yes"}), 422)
    assert_error(client.post("/v1/search", json={"embedding": {"indices": ["1"], "values": [1.0]}}), 422)
    assert_error(client.post("/v1/search", json={"embedding": {"indices": [1], "values": ["1.0"]}}), 422)
    assert_error(client.post("/v1/search", json={"embedding": {"indices": [True], "values": [1.0]}}), 422)
    assert_error(client.post("/v1/embed", json={"images": [b64(fashion_pngs(1)[0])], "dense": 1}), 422)
    assert_intact(client)


# ------------------------------------------------------------------------------------------ 9: docs, contract
def test_architecture_names_the_files_the_code_writes():
    from serve.durable_log import DB_NAME

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert f"INDEX_DIR/{DB_NAME}" in text
    assert "INDEX_DIR/wal.log" not in text and "`wal.py`" not in text


def _secured(spec: dict) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if isinstance(op, dict) and op.get("security")
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"api_key": None}, set()),
        ({}, {("put", "/v1/items"), ("delete", "/v1/items/{item_id}")}),
        (
            {"auth_reads": True},
            {
                ("put", "/v1/items"),
                ("delete", "/v1/items/{item_id}"),
                ("get", "/v1/items/{item_id}"),
                ("get", "/v1/info"),
                ("post", "/v1/embed"),
                ("post", "/v1/search"),
                ("post", "/v1/ood"),
                ("get", "/v1/drift"),
            },
        ),
    ],
    ids=["open", "writes", "reads-and-writes"],
)
def test_auth_is_declared_exactly_where_it_is_required(model_path, tmp_path, overrides, expected):
    app = create_app(serve_settings(model_path, tmp_path, **overrides))
    spec = app.openapi()
    secured = _secured(spec)
    assert {op for op in secured if op[1].startswith("/v1/")} == expected
    for method, path in secured:
        assert "401" in spec["paths"][path][method]["responses"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if (method, path) not in secured and path.startswith("/v1/"):
                assert "401" not in op["responses"], (method, path)


def test_every_stored_payload_is_strict_json(client, tmp_path):
    """What the database holds for the baseline is exactly the strict JSON of what was sent."""
    store = client.app.state.serve.store
    rows = {r.id: r for chunk in store.db.rows_after(0) for r in chunk}
    for item_id, (_, payload) in BASELINE.items():
        assert rows[item_id].payload == payload
        json.dumps(rows[item_id].payload, allow_nan=False).encode("utf-8")


@pytest.mark.parametrize("raw", ["١٢", "1_2", "+12", "12.0"])
def test_path_ids_are_not_coerced(client, raw):
    assert_error(client.get(f"/v1/items/{raw}"), 422)
    assert_error(client.delete(f"/v1/items/{raw}", headers=AUTH), 422)
    assert_intact(client)
