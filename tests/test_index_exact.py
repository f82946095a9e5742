"""Exact backends (csr with each kernel, faiss Flat) against numpy brute force on random sparse data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from test_index_support import assert_exact_topk, brute_force, random_csr

from index import create_index, kernels
from index.csr_index import CsrIndex
from index.kernels import CostModel
from index.topk import RunningTopK, topk_per_row

EXACT = [
    ("csr", {"kernel": "sparse"}),
    ("csr", {"kernel": "spdense"}),
    ("csr", {"kernel": "dense"}),
    ("csr", {"kernel": "auto"}),
    ("faiss", {"spec": "Flat"}),
]
IDS = pytest.mark.parametrize("backend,options", EXACT, ids=[f"{b}-{next(iter(o.values()))}" for b, o in EXACT])


@pytest.fixture(scope="module")
def data():
    db = random_csr(1500, 96, 0.08, seed=1, zero_rows=3)
    queries = random_csr(40, 96, 0.08, seed=2, zero_rows=1)
    ids = np.random.default_rng(3).choice(10**12, size=db.shape[0], replace=False)
    return db, queries, ids


@IDS
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_matches_brute_force(backend, options, metric, data):
    db, queries, ids = data
    # small chunks: the csr kernels must stitch top-k across many chunks and blocks
    extra = {"chunk_mb": 0.02} if backend == "csr" else {}
    index = create_index(backend, 96, metric, **options, **extra)
    for lo in range(0, db.shape[0], 400):  # several adds -> several CSR blocks
        index.add(ids[lo : lo + 400], db[lo : lo + 400])
    assert len(index) == db.shape[0]
    ref = brute_force(db.toarray(), queries.toarray(), metric)
    for k in (1, 10):
        scores, found = index.search(queries, k)
        assert_exact_topk(scores, found, ref, ids, k)
    # dense query input and a single 1-D query give the same answer
    s_dense, i_dense = index.search(queries.toarray(), 10)
    s_one, i_one = index.search(queries[5].toarray().ravel(), 10)
    np.testing.assert_allclose(s_dense, index.search(queries, 10)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_one[0], s_dense[5], rtol=1e-5, atol=1e-6)


@IDS
def test_k_larger_than_index_and_empty_index(backend, options):
    index = create_index(backend, 8, "ip", **options)
    scores, ids = index.search(np.ones((2, 8), np.float32), 5)
    assert ids.tolist() == [[-1] * 5] * 2 and np.all(np.isneginf(scores))
    db = random_csr(3, 8, 0.9, seed=4)
    index.add([10, 20, 30], db)
    q = random_csr(2, 8, 0.9, seed=5)
    scores, ids = index.search(q, 5)
    assert_exact_topk(scores, ids, brute_force(db.toarray(), q.toarray(), "ip"), np.array([10, 20, 30]), 5)


@IDS
def test_ties_are_ordered_by_id(backend, options):
    """Identical vectors under several ids tie exactly; output puts the smaller id first."""
    index = create_index(backend, 16, "cosine", **options)
    v = random_csr(1, 16, 0.5, seed=6)
    index.add([7, 3, 9], sp.vstack([v, v * 2, v * 3]))  # same direction: cosine 1 for all three
    index.add([1], random_csr(1, 16, 0.5, seed=7))
    scores, ids = index.search(v, 3)
    assert ids[0].tolist() == [3, 7, 9]
    np.testing.assert_allclose(scores[0], 1.0, rtol=1e-6)


def test_zero_query_and_zero_vectors_score_zero_under_cosine():
    index = CsrIndex(4, "cosine")
    index.add([1, 2], np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32))
    scores, ids = index.search(np.zeros((1, 4), np.float32), 2)
    np.testing.assert_array_equal(scores, [[0.0, 0.0]])
    assert sorted(ids[0].tolist()) == [1, 2]


def test_cost_model_picks_the_kernel_for_the_density():
    """Inverted index for very sparse data and single queries, BLAS for dense data with many queries."""
    sparse_db = CsrIndex(512)
    sparse_db.add(np.arange(2000), random_csr(2000, 512, 0.01, seed=8))
    assert sparse_db.choose_kernel(random_csr(1000, 512, 0.01, seed=9)) == "sparse"
    dense_db = CsrIndex(512)
    dense_db.add(np.arange(2000), random_csr(2000, 512, 0.75, seed=10))
    assert dense_db.choose_kernel(random_csr(1000, 512, 0.75, seed=11)) == "dense"
    # a single query on moderately dense data: the inverted index; on very dense data it is never used,
    # because it would double the memory for little gain
    mid_db = CsrIndex(512)
    mid_db.add(np.arange(2000), random_csr(2000, 512, 0.25, seed=17))
    assert mid_db.choose_kernel(random_csr(1, 512, 0.25, seed=12)) == "sparse"
    assert dense_db.choose_kernel(random_csr(1, 512, 0.01, seed=12)) in ("spdense", "dense")
    dense_db.prepare()
    assert all(b.xt is None for b in dense_db._blocks)
    costs = CostModel().costs(n_rows=10, dim=4, db_nnz=20, n_queries=3, sparse_products=30)
    assert set(costs) == {"sparse", "spdense", "dense"} and all(v > 0 for v in costs.values())


def test_direct_sparse_kernel_equals_public_scipy_path():
    """The fast path calls scipy's compiled mat-vec on crafted column ranges; it must agree with plain scipy."""
    assert kernels._direct_path_works()
    x = random_csr(3000, 300, 0.05, seed=15)
    q = random_csr(20, 300, 0.05, seed=16, zero_rows=2)  # empty queries too
    xt = kernels.transpose_csr(x)
    direct = kernels._scores_sparse_direct(xt, q)
    np.testing.assert_allclose(direct, kernels._scores_sparse_public(xt, q), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(direct, (q @ x.T).toarray(), rtol=1e-5, atol=1e-6)


def test_running_topk_matches_argsort():
    rng = np.random.default_rng(13)
    scores = rng.random((7, 1000)).astype(np.float32)
    top = RunningTopK(7, 12)
    for lo in range(0, 1000, 97):  # uneven chunks, the last one shorter than k
        top.push(0, scores[:, lo : lo + 97], lo)
    order = np.argsort(-scores, axis=1)[:, :12]
    assert np.array_equal(np.sort(top.rows, axis=1), np.sort(order, axis=1))
    np.testing.assert_array_equal(np.sort(top.scores, axis=1), np.sort(np.take_along_axis(scores, order, 1), 1))


@pytest.mark.parametrize(
    "shape,kind",
    [
        ((3, 5000), "random"),
        ((2, 100_003), "random"),
        ((4, 3000), "equal"),
        ((3, 2000), "neg-inf"),
        ((2, 70), "random"),
    ],
)
def test_topk_per_row_block_maxima_is_exact(shape, kind):
    """The block-maximum shortcut against a full sort: ragged tails, all-equal rows, -inf (masked) entries."""
    rng = np.random.default_rng(14)
    scores = rng.random(shape).astype(np.float32)
    if kind == "equal":
        scores[:] = 0.5
    if kind == "mostly-zero":  # very sparse data: nearly every score is an exact 0, a sea of ties
        scores[rng.random(shape) < 0.999] = 0
    if kind == "neg-inf":
        scores[:, rng.random(shape[1]) < 0.9] = -np.inf
    for k in (1, 10, 25):
        values, cols = topk_per_row(scores, k)
        assert values.shape == cols.shape == (shape[0], min(k, shape[1]))
        np.testing.assert_array_equal(np.take_along_axis(scores, cols, 1), values)  # indices match values
        np.testing.assert_array_equal(-np.sort(-values, axis=1), -np.sort(-scores, axis=1)[:, : values.shape[1]])
        assert all(len(set(row)) == len(row) for row in cols.tolist())


def test_threads_do_not_change_results(data):
    db, queries, ids = data
    one = CsrIndex(96, kernel="sparse", threads=1)
    two = CsrIndex(96, kernel="sparse", threads=2)
    for index in (one, two):
        index.add(ids, db)
    a, b = one.search(queries, 10), two.search(queries, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
