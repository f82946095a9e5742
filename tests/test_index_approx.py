"""Approximate FAISS backends: recall at default settings after auto-tuning, and the tuning itself."""

from __future__ import annotations

import numpy as np
import pytest
from test_index_support import random_csr

from index import create_index
from index.cli import fill_index

D = 256


def recall_at_10(index, queries, truth_index) -> float:
    found = index.search(queries, 10)[1]
    truth = truth_index.search(queries, 10)[1]
    return float(np.mean([np.intersect1d(f, t).size / 10 for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data():
    # Random sparse data has no cluster structure: the hard case for IVF and HNSW.
    return random_csr(4000, D, 0.2, seed=0), random_csr(300, D, 0.2, seed=1), random_csr(200, D, 0.2, seed=2)


@pytest.mark.parametrize("spec", ["IVF", "HNSW"])
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_default_settings_reach_recall_095_on_new_queries(spec, metric, data):
    db, queries, tune_queries = data
    exact = create_index("csr", D, metric)
    exact.add(np.arange(db.shape[0]), db)
    index = create_index("faiss", D, metric, spec=spec)
    index.add(np.arange(db.shape[0]), db)
    index.nprobe, index.ef_search = 1, 16  # FAISS's own defaults
    untuned = recall_at_10(index, queries, exact)
    report = index.tune(tune_queries)  # separate queries: the measured ones were never seen while tuning
    assert report["param"] == ("nprobe" if spec == "IVF" else "ef_search") and report["recall"] >= 0.95
    assert recall_at_10(index, queries, exact) >= 0.95
    assert untuned < 0.95  # the tuning did something: FAISS's own defaults fall short on this data


@pytest.mark.parametrize("total", [4000, None], ids=["held-out", "stored"])
def test_fill_index_tunes_on_vectors_it_holds_back(data, total):
    """The CLI's path: with the total known, rows held back from the index are the tuning queries (then
    added); without it, stored vectors are, each query's own id left out of the recall."""
    db, queries, _ = data
    index = create_index("faiss", D, "cosine", spec="HNSW16")
    chunks = [
        (np.arange(lo, lo + 1000), db[lo : lo + 1000], [{"row": i} for i in range(lo, lo + 1000)])
        for lo in range(0, 4000, 1000)
    ]
    summary = fill_index(index, chunks, total=total, target_recall=0.95, tune_queries=150)
    assert summary["count"] == len(index) == 4000 and summary["tuned"]["recall"] >= 0.95
    assert index.payload(3210) == {"row": 3210}  # held-back rows were added with their payloads
    np.testing.assert_allclose(index.reconstruct([3210]).toarray(), db[3210].toarray(), rtol=1e-5, atol=1e-6)
    exact = create_index("csr", D, "cosine")
    exact.add(np.arange(db.shape[0]), db)
    if total is not None:
        assert recall_at_10(index, queries, exact) >= 0.95


def test_fill_index_trains_ivf_on_all_chunks():
    """Data sorted by class must not train the IVF centroids on the first chunk only."""
    rng = np.random.default_rng(3)
    centres = rng.random((4, 16)) * (rng.random((4, 16)) < 0.5)
    blocks = [np.abs(c + 0.05 * rng.standard_normal((500, 16))) for c in centres]  # one "class" per chunk
    index = create_index("faiss", 16, "ip", spec="IVF8")
    fill_index(index, [(np.arange(i * 500, (i + 1) * 500), b, None) for i, b in enumerate(blocks)])
    assert len(index) == 2000 and index.nlist == 8
    lists = index._ivf().invlists
    sizes = [lists.list_size(i) for i in range(8)]
    assert sum(1 for s in sizes if s > 0) >= 4  # centroids cover every class, not one
