"""Persistence: round trips, corruption / truncation / mismatch detection, and crashes in the middle of a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_index_support import random_csr

from index import CorruptIndexError, IndexMismatchError, InvalidInputError, create_index, load_index
from index import store as store_module

ROOT = Path(__file__).resolve().parents[1]
D = 32
BACKENDS = [("csr", {}), ("faiss", {"spec": "Flat"}), ("faiss", {"spec": "IVF8"}), ("faiss", {"spec": "HNSW16"})]
NAMES = ["csr", "flat", "ivf", "hnsw"]


def built(backend: str, options: dict, n: int = 300, seed: int = 0, metric: str = "cosine"):
    index = create_index(backend, D, metric, **options, compact_ratio=0.9)
    x = random_csr(n, D, 0.3, seed=seed)
    ids = np.arange(n) * 3 + 7
    index.add(ids, x, [{"row": int(i)} for i in range(n)])
    index.remove(ids[:20])  # tombstones in memory; save must not persist removed vectors
    index.add(ids[20:30], random_csr(10, D, 0.3, seed=seed + 1))  # replacements
    index.metadata = {"model": {"sha256": "abc", "dim": D}}
    if getattr(index, "kind", None) in ("ivf", "hnsw"):
        index.tune(random_csr(30, D, 0.3, seed=seed + 2), k=5)
    return index


@pytest.mark.parametrize("backend,options", BACKENDS, ids=NAMES)
def test_round_trip(tmp_path, backend, options):
    index = built(backend, options)
    queries = random_csr(15, D, 0.3, seed=5)
    expect = index.search(queries, 8)
    manifest = index.save(tmp_path / "ix")
    assert manifest["count"] == len(index) == 280 and manifest["dim"] == D and manifest["metric"] == "cosine"
    assert manifest["backend"] == backend and manifest["format_version"] == store_module.FORMAT_VERSION
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    loaded = load_index(tmp_path / "ix", expected_dim=D)
    assert type(loaded) is type(index) and len(loaded) == 280
    got = loaded.search(queries, 8)
    np.testing.assert_array_equal(got[1], expect[1])
    np.testing.assert_allclose(got[0], expect[0], rtol=1e-6)
    assert loaded.payload(7 + 3 * 35) == {"row": 35} and loaded.metadata == index.metadata
    assert loaded.payload(7 + 3 * 25) is None  # replaced without a payload
    assert not loaded.contains([7])[0]
    np.testing.assert_allclose(loaded.reconstruct([67]).toarray(), index.reconstruct([67]).toarray(), rtol=1e-6)
    if backend == "faiss" and options["spec"] != "Flat":
        assert loaded.tuned == index.tuned and loaded.tuned["value"] >= 1
    loaded.add([1], np.ones((1, D)))  # a loaded index stays writable: add, remove (rebuild), save again
    loaded.remove(np.arange(30, 120) * 3 + 7)
    assert 1 in loaded and len(loaded) == 191
    loaded.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    assert len(again) == 191 and set(again.ids().tolist()) == set(loaded.ids().tolist())
    np.testing.assert_allclose(again.reconstruct([1]).toarray(), np.ones((1, D)), rtol=1e-6)


def test_second_save_replaces_generation_and_cleans_up(tmp_path):
    index = built("csr", {})
    index.save(tmp_path)
    first = {p.name for p in tmp_path.iterdir()}
    index.add([5], np.ones((1, D)))
    (tmp_path / "g000099-deadbeef-data.npy.tmp").write_bytes(b"left by a crash")
    manifest = index.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"manifest.json"} | {f["name"] for f in manifest["files"].values()}
    assert not names & (first - {"manifest.json"}) and manifest["generation"] > 99
    assert len(load_index(tmp_path)) == 281


@pytest.mark.parametrize("backend,options", [BACKENDS[0], BACKENDS[3]], ids=["csr", "hnsw"])
def test_corruption_truncation_and_missing_files_are_detected(tmp_path, backend, options):
    built(backend, options).save(tmp_path / "good")
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    for role, entry in manifest["files"].items():
        for damage in ("flip", "truncate", "delete"):
            case = tmp_path / f"{role}-{damage}"
            case.mkdir()
            for p in (tmp_path / "good").iterdir():
                (case / p.name).write_bytes(p.read_bytes())
            target = case / entry["name"]
            data = bytearray(target.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x40
                target.write_bytes(bytes(data))
                match = f"{entry['name']} \\({role}\\) is corrupted"
            elif damage == "truncate":
                target.write_bytes(bytes(data[: len(data) // 2]))
                match = "is truncated"
            else:
                target.unlink()
                match = "is missing"
            with pytest.raises(CorruptIndexError, match=match):
                load_index(case)


def test_bad_manifests_and_mismatches(tmp_path):
    index = built("csr", {})
    index.save(tmp_path / "ix")
    path = tmp_path / "ix" / "manifest.json"
    good = path.read_text()

    def edit(change, *, reseal: bool = True) -> None:
        """Change the manifest; ``reseal`` recomputes its own checksum, as a consistent but wrong manifest
        (e.g. copied from another index) would have."""
        m = json.loads(good)
        change(m)
        if reseal:
            m["manifest_sha256"] = store_module.manifest_digest(m)
        path.write_text(json.dumps(m))

    path.write_text(good[: len(good) // 2])
    with pytest.raises(CorruptIndexError, match="not valid JSON"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(dim=64), reseal=False)
    with pytest.raises(CorruptIndexError, match="altered or corrupted"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(format_version=99))
    with pytest.raises(IndexMismatchError, match="format version 99"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(format="something-else"))
    with pytest.raises(IndexMismatchError, match="not an lpjepa index"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(count=12))
    with pytest.raises(CorruptIndexError, match="files hold 280 vectors, the manifest says 12"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(dim=16))
    with pytest.raises(CorruptIndexError, match="column indices outside"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.update(backend="faiss"))
    with pytest.raises(CorruptIndexError, match="no valid entry for the 'faiss' file"):
        load_index(tmp_path / "ix")
    edit(lambda m: m.pop("metric"))
    with pytest.raises(CorruptIndexError, match="lacks the fields \\['metric'\\]"):
        load_index(tmp_path / "ix")
    edit(lambda m: m["files"]["ids"].update(name="../../etc/passwd"))
    with pytest.raises(CorruptIndexError, match="unexpected file"):
        load_index(tmp_path / "ix")
    path.write_text(good)
    with pytest.raises(IndexMismatchError, match="dimension 32 but the model produces 64"):
        load_index(tmp_path / "ix", expected_dim=64)
    with pytest.raises(IndexMismatchError, match="metric 'cosine', not 'ip'"):
        load_index(tmp_path / "ix", expected_metric="ip")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_index(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexMismatchError, match="not an index directory"):
        load_index(tmp_path / "empty")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="refusing to write into it"):
        index.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"x"


@pytest.mark.parametrize("fail_at", ["data file", "fsync", "manifest rename"])
def test_failure_in_the_middle_of_a_save_keeps_the_old_index(tmp_path, monkeypatch, fail_at):
    old = built("csr", {}, n=200, seed=1)
    old.save(tmp_path)
    expect = old.search(random_csr(5, D, 0.3, seed=9), 5)
    new = built("csr", {}, n=400, seed=2)

    class Crash(Exception):
        pass

    if fail_at == "data file":

        def write_npy(path, array):  # writes half a file, then dies
            path.write_bytes(b"\x93NUMPY" + b"\0" * 10)
            raise Crash

        monkeypatch.setattr(store_module, "write_npy", write_npy)
    elif fail_at == "fsync":
        calls = {"n": 0}
        real = os.fsync

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == 4:
                raise Crash
            return real(fd)

        monkeypatch.setattr(store_module.os, "fsync", fsync)
    else:
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("manifest.json"):
                raise Crash
            return real_replace(src, dst)

        monkeypatch.setattr(store_module.os, "replace", replace)
    with pytest.raises(Crash):
        new.save(tmp_path)
    monkeypatch.undo()
    survivor = load_index(tmp_path)
    assert len(survivor) == len(old)
    got = survivor.search(random_csr(5, D, 0.3, seed=9), 5)
    np.testing.assert_array_equal(got[1], expect[1])
    new.save(tmp_path)  # the next save succeeds and removes the debris
    assert len(load_index(tmp_path)) == len(new)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_index_support import random_csr
    from index import create_index
    target = sys.argv[1]
    indexes = []
    for n in (3000, 6000):
        index = create_index("csr", 64, "ip")
        index.add(np.arange(n), random_csr(n, 64, 0.3, seed=n))
        indexes.append(index)
    indexes[0].save(target)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        indexes[i % 2].save(target)
    """
)


def test_killed_process_during_saves_leaves_a_loadable_index(tmp_path):
    """SIGKILL a process that saves two different indexes over each other in a loop: whenever it dies, the
    directory holds one of the two complete indexes, never a mix."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    target = tmp_path / "ix"
    expected = {n: random_csr(n, 64, 0.3, seed=n) for n in (3000, 6000)}
    query = random_csr(3, 64, 0.3, seed=1)
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 0.3 * rng.random())
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        index = load_index(target)
        assert len(index) in expected, attempt
        x = expected[len(index)]
        ref = (query @ x.T).toarray()
        np.testing.assert_allclose(index.search(query, 3)[0], -np.sort(-ref, axis=1)[:, :3], rtol=1e-5)
