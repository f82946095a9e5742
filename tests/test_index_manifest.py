"""manifest.json through its pydantic model: the same keys on disk as before, unknown keys kept, and a wrong field
reported with its name and the file (the digest, format and version checks are test_index_store's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index import CorruptIndexError, create_index, load_index
from index import store as store_module


@pytest.fixture
def saved(tmp_path):
    index = create_index("csr", 8, "cosine")
    index.add([3, 5], np.eye(2, 8), [{"a": 1}, None])
    index.metadata = {"model": {"sha256": "abc", "dim": 8}}
    index.save(tmp_path / "ix")
    return tmp_path / "ix"


def _reseal(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["manifest_sha256"] = store_module.manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_on_disk_has_the_same_keys_and_types(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert sorted(manifest) == [
        "backend", "count", "created_utc", "dim", "files", "format", "format_version", "generation",
        "manifest_sha256", "metadata", "metric", "options", "software",
    ]  # fmt: skip
    assert manifest["format"] == "lpjepa-vector-index" and manifest["format_version"] == 1
    assert (manifest["backend"], manifest["dim"], manifest["metric"], manifest["count"]) == ("csr", 8, "cosine", 2)
    assert manifest["metadata"] == {"model": {"sha256": "abc", "dim": 8}} and manifest["generation"] == 1
    assert all(sorted(entry) == ["bytes", "name", "sha256"] for entry in manifest["files"].values())
    assert manifest["manifest_sha256"] == store_module.manifest_digest(manifest)
    assert store_module.read_manifest(saved) == manifest


def test_unknown_keys_of_a_newer_writer_are_kept(saved):
    _reseal(saved, lambda m: m.update(future={"x": 1}))
    assert store_module.read_manifest(saved)["future"] == {"x": 1}
    assert len(load_index(saved)) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(dim="many"), "field 'dim': Input should be a valid integer"),
        (lambda m: m.update(files=[]), "field 'files': Input should be a valid dictionary"),
        (lambda m: m["files"]["ids"].update(bytes="big"), "field 'files.ids.bytes'"),
        (lambda m: m["files"]["ids"].pop("sha256"), "field 'files.ids.sha256': Field required"),
        (lambda m: [m.pop("count"), m.pop("backend")], r"lacks the fields \['backend', 'count'\]"),
    ],
)
def test_a_wrong_field_is_named_with_the_file(saved, change, message):
    _reseal(saved, change)
    with pytest.raises(CorruptIndexError, match=message) as info:
        load_index(saved)
    assert str(saved / "manifest.json") in str(info.value)


def test_a_header_the_model_refuses_is_not_written(tmp_path):
    with pytest.raises(CorruptIndexError, match="lacks the fields"):
        store_module.save_dir(tmp_path / "ix", {"backend": "csr", "dim": 8}, {})
    assert not (tmp_path / "ix").exists()
