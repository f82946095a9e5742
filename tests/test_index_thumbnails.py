"""Thumbnails as a per-item attribute of the index: made from real images, replaced/removed with their item,
saved as a manifest-checked data file, and checked on the way in and on the way back."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_index_support import random_csr

from index import CorruptIndexError, InvalidInputError, create_index, load_index
from index import store as store_module
from index.thumbnails import MAX_THUMBNAIL_BYTES, read_thumbnails, thumbnail_png, write_thumbnails

D = 16
BACKENDS = [("csr", {}), ("faiss", {"spec": "Flat"}), ("faiss", {"spec": "HNSW16"})]


@pytest.fixture(scope="module")
def fashion():
    from data.sources import open_source

    source = open_source("fashion-mnist:test")
    return [source.image(i) for i in range(8)]


def test_thumbnail_png_shrinks_but_never_enlarges_and_keeps_the_pixels(fashion):
    small = Image.open(io.BytesIO(thumbnail_png(fashion[0], 64)))
    assert small.size == (28, 28) and small.mode == "L"  # 28 px Fashion-MNIST stays 28 px, no upscaling
    np.testing.assert_array_equal(np.asarray(small), np.asarray(fashion[0]))  # PNG is lossless
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    thumb = Image.open(io.BytesIO(thumbnail_png(photo, 64)))
    assert thumb.size == (43, 64) and thumb.mode == "RGB"  # longest side 64, aspect ratio kept
    assert thumbnail_png(photo, 0) is None
    rgba = thumbnail_png(photo.convert("RGBA"), 32)
    assert Image.open(io.BytesIO(rgba)).mode == "RGB"
    for bad in (-1, 257):
        with pytest.raises(InvalidInputError, match="thumbnail size"):
            thumbnail_png(photo, bad)


@pytest.mark.parametrize("backend,options", BACKENDS, ids=["csr", "flat", "hnsw"])
def test_thumbnails_follow_their_item_through_replace_remove_and_save(tmp_path, fashion, backend, options):
    index = create_index(backend, D, "cosine", **options)
    thumbs = [thumbnail_png(img, 64) for img in fashion]
    index.add(np.arange(8) + 100, random_csr(8, D, 0.4, seed=1), [{"row": i} for i in range(8)], thumbs)
    assert index.thumbnails([100, -1, 107]) == [thumbs[0], None, thumbs[7]]
    index.add([101], random_csr(1, D, 0.4, seed=2))  # replaced without a thumbnail: the old one goes
    index.add([102], random_csr(1, D, 0.4, seed=3), None, [thumbs[5]])  # replaced with another one
    index.remove([103])
    assert index.thumbnail_count == 6
    with pytest.raises(ValueError, match="unknown ids: 103"):
        index.thumbnails([103])
    manifest = index.save(tmp_path / "ix")
    entry = manifest["files"]["thumbnails"]
    assert entry["name"].endswith("-thumbnails.npz") and entry["bytes"] < 6 * 1024  # ~0.5 KB per 28 px PNG
    loaded = load_index(tmp_path / "ix")
    assert loaded.thumbnails([100, 101, 102, 104]) == [thumbs[0], None, thumbs[5], thumbs[4]]
    assert loaded.thumbnail_count == 6
    decoded = Image.open(io.BytesIO(loaded.thumbnails([107])[0]))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(fashion[7]))


def test_an_index_without_thumbnails_has_no_thumbnail_file(tmp_path):
    index = create_index("csr", D, "ip")
    index.add([1, 2], random_csr(2, D, 0.5, seed=0))
    manifest = index.save(tmp_path / "ix")
    assert "thumbnails" not in manifest["files"]  # indexes written before thumbnails existed look the same
    assert load_index(tmp_path / "ix").thumbnails([1, 2]) == [None, None]


def test_bad_thumbnails_are_refused_before_the_index_changes(fashion):
    index = create_index("csr", D, "ip")
    good = thumbnail_png(fashion[0], 64)
    jpeg = io.BytesIO()
    fashion[0].save(jpeg, format="JPEG")
    cases = [
        ([good], "got 1 thumbnails for 2 ids"),
        (good, "one PNG"),
        ([good, "not bytes"], "thumbnail 1 must be PNG bytes"),
        ([good, jpeg.getvalue()], "thumbnail 1 is not a PNG"),
        ([good, good[:8] + b"\0" * MAX_THUMBNAIL_BYTES], "at most"),
    ]
    for thumbs, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            index.add([1, 2], random_csr(2, D, 0.5, seed=0), None, thumbs)
        assert len(index) == 0


def test_a_damaged_or_inconsistent_thumbnail_file_is_detected(tmp_path, fashion):
    index = create_index("csr", D, "ip")
    index.add([1, 2, 3], random_csr(3, D, 0.5, seed=0), None, [thumbnail_png(img, 64) for img in fashion[:3]])
    manifest = index.save(tmp_path / "ix")
    path = tmp_path / "ix" / manifest["files"]["thumbnails"]["name"]
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="thumbnails\\) is corrupted"):
        load_index(tmp_path / "ix")

    # A structurally wrong file that matches its (resealed) manifest entry: the reader's own checks catch it.
    def reseal(content: bytes) -> None:
        path.write_bytes(content)
        m = json.loads((tmp_path / "ix" / "manifest.json").read_text())
        m["files"]["thumbnails"].update(sha256=store_module.file_sha256(path), bytes=len(content))
        m["manifest_sha256"] = store_module.manifest_digest(m)
        (tmp_path / "ix" / "manifest.json").write_text(json.dumps(m))

    reseal(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptIndexError, match="cannot read"):
        load_index(tmp_path / "ix")
    buf = io.BytesIO()
    np.savez(buf, ids=np.array([2, 1]), offsets=np.array([0, 3, 6]), data=np.zeros(6, np.uint8))
    reseal(buf.getvalue())
    with pytest.raises(CorruptIndexError, match="not a thumbnail file"):
        load_index(tmp_path / "ix")
    other = tmp_path / "other.npz"
    write_thumbnails(other, {1: b"\x89PNG\r\n\x1a\nA", 9: b"\x89PNG\r\n\x1a\nB"})
    assert read_thumbnails(other) == {1: b"\x89PNG\r\n\x1a\nA", 9: b"\x89PNG\r\n\x1a\nB"}
    reseal(other.read_bytes())
    with pytest.raises(CorruptIndexError, match="thumbnails for ids not in the index"):
        load_index(tmp_path / "ix")


@pytest.mark.parametrize("spec", ["HNSW16", "IVF4"])
def test_fill_index_keeps_each_thumbnail_with_its_row(spec):
    """The CLI's filling path holds rows back (HNSW tuning) or gathers all chunks (IVF training): thumbnails
    must travel with their rows through both, as payloads do."""
    from index.cli import fill_index

    rng = np.random.default_rng(4)
    pngs = {}
    for i in range(600):  # a real PNG per row: 2 x 2 random pixels, so a row that got another row's shows
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (2, 2), dtype=np.uint8)).save(buf, format="PNG")
        pngs[i] = buf.getvalue()
    chunks = [
        (np.arange(lo, lo + 200), random_csr(200, D, 0.4, seed=lo), None, [pngs[i] for i in range(lo, lo + 200)])
        for lo in range(0, 600, 200)
    ]
    index = create_index("faiss", D, "cosine", spec=spec)
    summary = fill_index(index, chunks, total=600, tune_queries=100)
    assert summary["count"] == 600 and index.thumbnail_count == 600
    assert index.thumbnails(np.arange(600)) == [pngs[i] for i in range(600)]
