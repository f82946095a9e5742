"""Add / replace / remove, payloads, input validation and concurrent use, for every backend."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.sparse as sp
from test_index_support import assert_exact_topk, brute_force, random_csr

from index import (
    DimensionMismatchError,
    IndexError_,
    InvalidInputError,
    UnknownIdError,
    create_index,
)

BACKENDS = [
    ("csr", {}),
    ("faiss", {"spec": "Flat"}),
    ("faiss", {"spec": "IVF4"}),
    ("faiss", {"spec": "HNSW16"}),
    ("milvus", {"milvus": True}),  # a real Milvus: the session's local server (tests/conftest.py)
]
NAMES = ["csr", "flat", "ivf", "hnsw", "milvus"]
ALL = pytest.mark.parametrize("backend,options", BACKENDS, ids=NAMES, indirect=["options"])
D = 24


def make(backend, options, metric="ip", **extra):
    if backend == "milvus":
        extra.pop("compact_ratio", None)  # Milvus compacts its own segments
    index = create_index(backend, D, metric, **options, **extra)
    if options.get("spec", "").startswith("IVF"):
        index.train(random_csr(400, D, 0.3, seed=99))
    if options.get("spec", "").startswith("HNSW"):
        index.ef_search = 256  # exhaustive on these sizes: these tests check bookkeeping, not recall
    if options.get("spec", "").startswith("IVF"):
        index.nprobe = 4
    return index


def exact_check(index, db: dict[int, np.ndarray], queries: np.ndarray, k: int = 5, metric: str = "ip") -> None:
    """Exact backends (and IVF probing every list): identical top-k up to ties. HNSW is approximate, and with
    inner product a small-norm vector may have no incoming edge at all, so there: only live ids, each with its
    true score, and most of the true top-k."""
    ids = np.array(sorted(db))
    ref = brute_force(np.stack([db[i] for i in ids]), queries, metric)
    scores, found = index.search(queries, k)
    if getattr(index, "kind", None) != "hnsw":
        assert_exact_topk(scores, found, ref, ids, k)
        return
    col_of = {int(i): c for c, i in enumerate(ids)}
    hits = 0
    for q in range(len(queries)):
        got = [int(i) for i in found[q] if i >= 0]
        assert set(got) <= set(col_of)
        np.testing.assert_allclose(scores[q, : len(got)], [ref[q, col_of[i]] for i in got], rtol=1e-4, atol=1e-5)
        hits += len(set(got) & set(ids[np.argsort(-ref[q])[:k]].tolist()))
    assert hits >= 0.8 * k * len(queries)


@ALL
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_add_replace_remove_against_brute_force(backend, options, metric):
    rng = np.random.default_rng(0)
    index = make(backend, options, metric, compact_ratio=0.9)  # keep tombstones around
    current: dict[int, np.ndarray] = {}
    queries = random_csr(12, D, 0.3, seed=1).toarray()
    for step in range(4):
        ids = rng.choice(300, 80, replace=False)  # overlaps earlier steps: replaces
        vecs = random_csr(80, D, 0.3, seed=10 + step).toarray()
        index.add(ids, vecs if step % 2 else sp.csr_matrix(vecs))
        current.update(zip(ids.tolist(), vecs, strict=True))
        gone = rng.choice(sorted(current), 15, replace=False)
        index.remove(gone)
        for i in gone.tolist():
            del current[i]
        assert len(index) == len(current)
        assert set(index.ids().tolist()) == set(current)
        exact_check(index, current, queries, metric=metric)
        for i in gone.tolist():
            assert i not in index
    # replaced vectors are the new ones, in the form they were given (cosine keeps the original scale)
    some = np.array(sorted(current)[:5])
    got = index.reconstruct(some).toarray()
    np.testing.assert_allclose(got, np.stack([current[i] for i in some]), rtol=1e-5, atol=1e-6)


@ALL
def test_removed_ids_never_returned_even_when_k_exceeds_live_count(backend, options):
    index = make(backend, options, compact_ratio=1.0)
    x = random_csr(50, D, 0.4, seed=2)
    index.add(np.arange(50), x)
    index.remove(np.arange(0, 50, 2))
    scores, ids = index.search(x, 40)
    live = set(range(1, 50, 2))
    for row_ids, row_scores in zip(ids, scores, strict=True):
        returned = set(row_ids[row_ids >= 0].tolist())
        assert returned <= live
        assert np.all(np.isneginf(row_scores[row_ids < 0]))
    if backend in ("csr", "milvus") or options.get("spec") == "Flat":  # exact: every live vector comes back
        assert all(set(r[r >= 0].tolist()) == live for r in ids)


@pytest.mark.parametrize("backend,options", BACKENDS[:4], ids=NAMES[:4], indirect=["options"])
def test_compaction_keeps_results(backend, options):
    index = make(backend, options, compact_ratio=0.3)
    current = {i: v for i, v in enumerate(random_csr(120, D, 0.4, seed=3).toarray())}
    index.add(list(current), np.stack(list(current.values())))
    for lo in range(0, 60, 10):  # crosses the 30% threshold: rebuild happens on the way
        index.remove(np.arange(lo, lo + 10))
        for i in range(lo, lo + 10):
            del current[i]
    if backend == "csr" or options["spec"] != "Flat":
        assert index.dead_rows < 0.3 * index.total_rows
    assert index.total_rows < 120
    exact_check(index, current, random_csr(8, D, 0.4, seed=4).toarray())
    index.add([5], np.ones((1, D), np.float32))  # a removed id can come back
    assert 5 in index and len(index) == 61


@ALL
def test_payloads_follow_their_ids(backend, options):
    index = make(backend, options)
    index.add([1, 2, 3], random_csr(3, D, 0.5, seed=5), [{"label": 1}, None, {"path": "a.png", "tags": [1, 2]}])
    assert index.payloads([3, 1, 2]) == [{"path": "a.png", "tags": [1, 2]}, {"label": 1}, None]
    index.add([1], random_csr(1, D, 0.5, seed=6), [{"label": 7}])  # replace: new payload
    assert index.payload(1) == {"label": 7}
    index.add([3], random_csr(1, D, 0.5, seed=7))  # replace without payload: payload gone
    assert index.payload(3) is None
    index.remove([1])
    with pytest.raises(UnknownIdError, match="unknown ids: 1"):
        index.payload(1)
    payload = {"nested": {"x": [1.5]}}
    index.add([9], random_csr(1, D, 0.5, seed=8), [payload])
    payload["nested"]["x"].append(2)  # the caller's later edits must not leak into the index
    assert index.payload(9) == {"nested": {"x": [1.5]}}


@ALL
def test_bad_input_is_rejected_with_clear_errors_and_changes_nothing(backend, options):
    index = make(backend, options)
    good = random_csr(4, D, 0.5, seed=9)
    index.add([1, 2, 3, 4], good)
    before = index.search(good, 3)
    cases = [
        (
            lambda: index.add([5], np.ones((1, D + 1))),
            DimensionMismatchError,
            f"{D + 1} dimensions.*index dimension is {D}",
        ),
        (lambda: index.search(np.ones((1, 7)), 3), DimensionMismatchError, "queries have 7 dimensions"),
        (lambda: index.add([5], np.full((1, D), np.nan)), InvalidInputError, "NaN or infinite"),
        (
            lambda: index.add([5, 6], sp.csr_matrix(np.vstack([np.ones(D), [np.inf] + [0] * (D - 1)]))),
            InvalidInputError,
            "row 1",
        ),
        (lambda: index.add([5], -np.ones((1, D))), InvalidInputError, "negative values.*non-negative"),
        (lambda: index.search(-np.ones((1, D)), 3), InvalidInputError, "queries contain negative"),
        (lambda: index.remove([2, 77, 78]), UnknownIdError, r"unknown ids: 77, 78 \(2 of 3"),
        (lambda: index.add([5, 5], np.ones((2, D))), InvalidInputError, "duplicates: \\[5\\]"),
        (lambda: index.add([-3], np.ones((1, D))), InvalidInputError, "ids must be in"),
        (lambda: index.add([1.5], np.ones((1, D))), InvalidInputError, "ids must be integers"),
        (lambda: index.add([5, 6], np.ones((1, D))), InvalidInputError, "2 ids for 1 vectors"),
        (lambda: index.add([5], np.array([["a"] * D])), InvalidInputError, "numeric"),
        (lambda: index.add([5], np.ones((1, D)), [{"x": object()}]), InvalidInputError, "not JSON-serialisable"),
        (lambda: index.add([5], np.ones((1, D)), [{}, {}]), InvalidInputError, "2 payloads for 1 ids"),
        (lambda: index.search(good, 0), InvalidInputError, "k must be a positive integer"),
        (lambda: index.reconstruct([404]), UnknownIdError, "404"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert issubclass(UnknownIdError, IndexError_) and issubclass(IndexError_, ValueError)
    after = index.search(good, 3)
    np.testing.assert_array_equal(before[1], after[1])  # nothing changed, 2 was not removed
    assert len(index) == 4


def test_bad_construction_options():
    with pytest.raises(InvalidInputError, match="unknown index backend 'annoy'"):
        create_index("annoy", 8)
    with pytest.raises(InvalidInputError, match="unknown metric 'l2'"):
        create_index("csr", 8, "l2")
    with pytest.raises(InvalidInputError, match="dimension must be a positive integer"):
        create_index("csr", 0)
    with pytest.raises(InvalidInputError, match="unsupported FAISS index 'PQ16'"):
        create_index("faiss", 8, spec="PQ16")
    with pytest.raises(InvalidInputError, match="unknown kernel"):
        create_index("csr", 8, kernel="gpu")
    with pytest.raises(InvalidInputError, match="bad option for the csr backend"):
        create_index("csr", 8, spec="Flat")
    ivf = create_index("faiss", 8, spec="IVF64")
    with pytest.raises(InvalidInputError, match="IVF64 needs at least 64 training vectors"):
        ivf.add(np.arange(10), np.ones((10, 8)))
    assert len(ivf) == 0


@pytest.mark.parametrize(
    "backend,options", [BACKENDS[0], BACKENDS[3], BACKENDS[4]], ids=["csr", "hnsw", "milvus"], indirect=["options"]
)
def test_concurrent_add_search_remove(backend, options):
    """Writers and readers in parallel: no errors, and once a remove returns its ids never come back."""
    index = make(backend, options, compact_ratio=0.3)
    x = random_csr(600, D, 0.4, seed=11)
    index.add(np.arange(200), x[:200])
    removed: set[int] = set()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer() -> None:
        try:
            for lo in range(200, 600, 40):
                index.add(np.arange(lo, lo + 40), x[lo : lo + 40])
                gone = np.arange(lo - 200, lo - 180)
                index.remove(gone)
                with lock:
                    removed.update(gone.tolist())
        except BaseException as err:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(err)

    def reader(seed: int) -> None:
        try:
            q = random_csr(5, D, 0.4, seed=seed)
            for _ in range(30):
                with lock:
                    gone_before = set(removed)
                _, ids = index.search(q, 10)
                assert not (set(ids.ravel().tolist()) & gone_before)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert len(index) == 600 - len(removed)
