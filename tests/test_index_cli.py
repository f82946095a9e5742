"""`lpjepa index build` / `lpjepa search` end to end on a tiny exported model and real Fashion-MNIST images."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_index_support import brute_force

from cli.main import main
from index import create_index, load_index

pytestmark = pytest.mark.slow
N = 300


@pytest.fixture(scope="module")
def embeddings(model_path, fmnist):
    """Reference embeddings of the first N test images, computed without the index code."""
    from export.runtime import EmbeddingRuntime

    return EmbeddingRuntime(model_path).embed([fmnist[i][0] for i in range(N)]).toarray()


@pytest.fixture(scope="module")
def built(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "index"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["index", "build", "--model", str(model_path), "--data", "fashion-mnist:test", "--out", str(out),
                     "--limit", str(N), "--no-progress"])  # fmt: skip
    assert code == 0
    (out.parent / "summary.json").write_text(printed.getvalue())
    return out


def test_build_writes_an_index_of_the_split(built, embeddings, fmnist, capsys):
    index = load_index(built)
    assert len(index) == N and index.metric == "cosine" and index.dim == embeddings.shape[1]
    assert index.ids().tolist() == list(range(N))  # the id is the row number in the split
    for row in (0, 17, N - 1):
        payload = index.payload(row)
        assert payload["row"] == row and payload["label"] == fmnist[row][1]
        assert payload["source"] == "fashion-mnist:test" and payload["class"]
    np.testing.assert_allclose(index.reconstruct([17]).toarray()[0], embeddings[17], rtol=1e-5, atol=1e-6)
    assert index.metadata["model"]["dim"] == embeddings.shape[1]
    thumbs = index.thumbnails([0, 17, N - 1])  # on by default: one lossless PNG of each indexed image
    for row, png in zip((0, 17, N - 1), thumbs, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(fmnist[row][0]))
    assert index.thumbnail_count == N
    summary = json.loads((built.parent / "summary.json").read_text())
    assert summary["thumbnails"] == N and 0 < summary["thumbnail_bytes"] < N * 1024


def test_build_without_thumbnails(model_path, tmp_path, capsys):
    out = tmp_path / "plain"
    args = ["index", "build", "--model", str(model_path), "--data", "fashion-mnist:test", "--out", str(out),
            "--limit", "20", "--thumbnails", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["thumbnails"] == 0
    index = load_index(out)
    assert len(index) == 20 and index.thumbnail_count == 0
    assert "thumbnails" not in json.loads((out / "manifest.json").read_text())["files"]


def test_search_json_matches_brute_force(built, model_path, embeddings, fmnist, tmp_path, capsys):
    image = tmp_path / "query.png"
    fmnist[17][0].save(image)
    capsys.readouterr()
    assert (
        main(["search", "--model", str(model_path), "--index", str(built), "--image", str(image), "-k", "5", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    results = out["results"]
    assert len(results) == 5 and set(results[0]) == {"id", "score", "payload"}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    ref = brute_force(embeddings, embeddings[17:18], "cosine")[0]
    np.testing.assert_allclose(scores, np.sort(ref)[::-1][:5], rtol=1e-4, atol=1e-5)
    for r in results:  # each id carries its true score and its own payload
        assert r["score"] == pytest.approx(ref[r["id"]], rel=1e-4, abs=1e-5)
        assert r["payload"]["row"] == r["id"]
    assert 17 in [r["id"] for r in results if r["score"] >= ref.max() - 1e-5]  # the image finds itself

    assert main(["search", "--model", str(model_path), "--index", str(built), "--image", str(image), "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "id", "score", "payload"] and len(table) == 4


def test_build_faiss_hnsw_is_tuned(model_path, tmp_path, capsys):
    out = tmp_path / "hnsw"
    args = ["index", "build", "--model", str(model_path), "--data", "fashion-mnist:test", "--out", str(out),
            "--limit", "400", "--backend", "faiss", "--faiss-index", "HNSW16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 400 and summary["tuned"]["param"] == "ef_search"
    assert summary["tuned"]["recall"] >= 0.95
    index = load_index(out)
    assert index.backend == "faiss" and index.kind == "hnsw" and len(index) == 400
    assert index.ef_search == summary["tuned"]["value"]


def assert_one_line_errors(cases: list[tuple[list[str], str]], capsys) -> None:
    """Each argv exits 2 with one line on stderr that holds its message."""
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_errors_exit_2_with_one_line(model_path, built, tmp_path, capsys):
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (28, 28), 128).save(image)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    other = create_index("csr", 8, "cosine")
    other.add([1], np.ones((1, 8)))
    other.save(tmp_path / "dim8")
    cases = [
        (["search", "--model", str(tmp_path / "none.onnx"), "--index", str(built), "--image", str(image)],
         "no model file"),
        (["search", "--model", str(model_path), "--index", str(tmp_path / "missing"), "--image", str(image)],
         "does not exist"),
        (["search", "--model", str(model_path), "--index", str(tmp_path / "notes"), "--image", str(image)],
         "not an index directory"),
        (["search", "--model", str(model_path), "--index", str(tmp_path / "dim8"), "--image", str(image)],
         "dimension 8 but the model produces"),
        (["search", "--model", str(model_path), "--index", str(built), "--image", str(tmp_path / "nope.png")],
         "no image file"),
        (["search", "--model", str(model_path), "--index", str(built), "--image", str(tmp_path / "broken.png")],
         "image 0"),
        (["index", "build", "--model", str(model_path), "--data", "fashion-mnist:test", "--out", str(tmp_path / "x"),
          "--backend", "faiss", "--faiss-index", "PQ8"], "unsupported FAISS index 'PQ8'"),
        (["index", "build", "--model", str(model_path), "--data", "no-such-dataset", "--out", str(tmp_path / "y")],
         "unknown data spec"),
        (["index", "build", "--model", str(model_path), "--data", "fashion-mnist:test", "--limit", "5",
          "--out", str(tmp_path / "notes"), "--no-progress"], "refusing to write into it"),
    ]  # fmt: skip
    assert_one_line_errors(cases, capsys)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    bad_px = ["index", "build", "--model", "m", "--data", "d", "--out", "o", "--thumbnails"]
    for argv in (["search", "--model", "m", "--index", "i", "--image", "x", "-k", "0"], ["index"],
                 [*bad_px, "257"], [*bad_px, "-1"], [*bad_px, "big"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


# ---------------------------------------------------------------------- the milvus backend (a real local Milvus)
def _milvus_build(model, uri, collection, *extra):
    return ["index", "build", "--model", str(model), "--data", "fashion-mnist:test", "--limit", str(N), "--backend",
            "milvus", "--milvus-uri", uri, "--collection", collection, "--no-progress", *extra]  # fmt: skip


def test_milvus_build_equals_the_csr_build_and_n_shards_equal_one_build(
    built, model_path, milvus_server, tmp_path, capsys
):
    """One build into a collection holds what the csr directory holds; 3 shard builds into another collection
    hold exactly the same ids, payloads and vectors; `lpjepa search --backend milvus` ranks like csr."""
    from index.milvus_index import open_milvus_index

    uri = milvus_server.uri
    assert main(_milvus_build(model_path, uri, "cli_single")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == N and summary["collection"] == "cli_single" and summary["rows"] == [0, N]
    for i in range(3):
        assert main(_milvus_build(model_path, uri, "cli_sharded", "--shard", f"{i}/3")) == 0
        part = json.loads(capsys.readouterr().out)
        assert part["shard"] == f"{i}/3" and part["rows"] == [i * N // 3, (i + 1) * N // 3]
    reference = load_index(built)
    single = open_milvus_index(uri, "cli_single", expected_dim=reference.dim)
    sharded = open_milvus_index(uri, "cli_sharded", expected_dim=reference.dim)
    ids = reference.ids()
    for index in (single, sharded):
        assert index.ids().tolist() == ids.tolist() and index.metric == "cosine"
        assert index.payloads(ids) == reference.payloads(ids)
        np.testing.assert_allclose(index.reconstruct(ids).toarray(), reference.reconstruct(ids).toarray(), rtol=1e-5)
        assert index.metadata["model"]["sha256"] == reference.metadata["model"]["sha256"]

    image = tmp_path / "q.png"
    from data.sources import open_source

    open_source("fashion-mnist:test")[17][0].save(image)
    results = {}
    milvus_flags = ["--backend", "milvus", "--milvus-uri", uri, "--collection", "cli_sharded"]
    for name, where in (("csr", ["--index", str(built)]), ("milvus", milvus_flags)):
        assert main(["search", "--model", str(model_path), *where, "--image", str(image), "-k", "5", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in results["milvus"]] == [r["id"] for r in results["csr"]]
    np.testing.assert_allclose([r["score"] for r in results["milvus"]], [r["score"] for r in results["csr"]], rtol=1e-5)

    # a rebuild without --shard replaces the collection; a shard of another model's build is refused
    assert main(_milvus_build(model_path, uri, "cli_sharded", "--limit", "30")) == 0
    capsys.readouterr()
    assert len(open_milvus_index(uri, "cli_sharded")) == 30
    assert main(_milvus_build(model_path, uri, "cli_sharded", "--shard", "1/2")) == 2  # --limit N: not that build
    assert "the shards of one index need the same" in capsys.readouterr().err


def test_milvus_cli_errors_exit_2_with_one_line(model_path, milvus_server, tmp_path, capsys):
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (28, 28), 128).save(image)
    base = [
        "index",
        "build",
        "--model",
        str(model_path),
        "--data",
        "fashion-mnist:test",
        "--limit",
        "5",
        "--no-progress",
    ]
    dead = "http://127.0.0.1:1"
    cases = [
        (base + ["--backend", "milvus"], "needs --milvus-uri"),
        (base + ["--backend", "milvus", "--milvus-uri", milvus_server.uri, "--out", str(tmp_path / "o")],
         "--out is for csr and faiss"),
        (base + ["--out", str(tmp_path / "o"), "--shard", "0/2"], "--shard needs --backend milvus"),
        (base + ["--out", str(tmp_path / "o"), "--milvus-uri", milvus_server.uri], "--milvus-uri is for --backend"),
        (base + ["--backend", "milvus", "--milvus-uri", dead, "--milvus-timeout", "1"], "cannot connect to Milvus"),
        (["search", "--model", str(model_path), "--image", str(image)], "give --index DIR, or --backend milvus"),
        (["search", "--model", str(model_path), "--image", str(image), "--backend", "milvus", "--milvus-uri",
          milvus_server.uri, "--collection", "never_built"], "has no collection 'never_built'"),
    ]  # fmt: skip
    assert_one_line_errors(cases, capsys)
    for bad in ("2/2", "1/0", "x"):
        with pytest.raises(SystemExit):
            main(base + ["--backend", "milvus", "--milvus-uri", milvus_server.uri, "--shard", bad])
