"""Exact backends (csr with each kernel, faiss Flat) against numpy brute force on random sparse data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_index_support import assert_exact_topk, brute_force, random_csr

from index import create_index, csr_index, inverted
from index.csr_index import CsrIndex
from index.inverted import build_inverted, search_inverted
from index.kernels import CostModel
from index.topk import RunningTopK

EXACT = [
    ("csr", {"kernel": "sparse"}),
    ("csr", {"kernel": "spdense"}),
    ("csr", {"kernel": "dense"}),
    ("csr", {"kernel": "auto"}),
    ("faiss", {"spec": "Flat"}),
    ("milvus", {"milvus": True, "index": "exact"}),  # a real Milvus (tests/conftest.py)
    ("milvus", {"milvus": True, "index": "wand"}),
]
IDS = pytest.mark.parametrize(
    "backend,options", EXACT, ids=[f"{b}-{list(o.values())[-1]}" for b, o in EXACT], indirect=["options"]
)


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
    assert all(b.inv is None for b in dense_db._blocks)
    costs = CostModel().costs(n_rows=10, dim=4, db_nnz=20, n_queries=3, sparse_products=30)
    assert set(costs) == {"sparse", "spdense", "dense"} and all(v > 0 for v in costs.values())


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
        ((3, 20_000), "mostly-zero"),
        ((3, 2000), "neg-inf"),
        ((2, 70), "random"),
        ((2, 5), "random"),
    ],
)
def test_running_topk_is_exact_with_ties_to_the_smaller_row(shape, kind):
    """The heap scan against a stable full sort: ragged stretches, seas of ties, -inf (masked) entries, k > row."""
    rng = np.random.default_rng(14)
    scores = rng.random(shape).astype(np.float32)
    if kind == "equal":
        scores[:] = 0.5
    if kind == "mostly-zero":  # very sparse data: nearly every score is an exact 0
        scores[rng.random(shape) < 0.999] = 0
    if kind == "neg-inf":
        scores[:, rng.random(shape[1]) < 0.9] = -np.inf
    for k in (1, 10, 25):
        top = RunningTopK(shape[0], k)
        for lo in range(0, shape[1], 3001):
            top.push(0, scores[:, lo : lo + 3001], lo)
        finite = np.isfinite(scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: smaller column first
        for row in range(shape[0]):
            want = [c for c in order[row] if finite[row, c]]
            got = sorted(int(c) for c in top.rows[row] if c >= 0)
            assert got == sorted(want)
            assert np.all(top.rows[row][top.rows[row] < 0] == -1)
            np.testing.assert_array_equal(
                np.sort(top.scores[row][top.rows[row] >= 0]), np.sort(scores[row, got]) if got else []
            )


@pytest.mark.parametrize("tile", [1, 7, 128, 65536])
def test_inverted_search_matches_dense_product(tile):
    """Several tiles (tile 1 and 7 put rows on tile edges), removed rows, empty queries, ties to the smaller row."""
    x = random_csr(900, 40, 0.1, seed=18, zero_rows=5)
    x = sp.vstack([x, x[:50]], format="csr")  # duplicated rows: exact ties whose smaller row must win
    x.indices, x.indptr = x.indices.astype(np.int32), x.indptr.astype(np.int32)
    q = random_csr(25, 40, 0.2, seed=19, zero_rows=2)
    alive = np.random.default_rng(20).random(x.shape[0]) < 0.85
    inv = build_inverted(x, tile)
    assert inv.nbytes == inv.indptr.nbytes + x.nnz * 6  # uint16 rows + float32 values
    for mask in (None, alive):
        top = RunningTopK(q.shape[0] + 3, 10)
        search_inverted(inv, q, 0, 12, top.scores, top.rows, 3, 1000, mask)  # heap rows offset by 3
        search_inverted(inv, q, 12, q.shape[0], top.scores, top.rows, 15, 1000, mask)
        ref = (q @ x.T).toarray()
        if mask is not None:
            ref[:, ~mask] = -np.inf
        order = np.argsort(-ref, axis=1, kind="stable")[:, :10]
        assert np.array_equal(np.sort(top.rows[3:], axis=1), np.sort(order + 1000, axis=1))
        np.testing.assert_allclose(
            np.sort(top.scores[3:], axis=1), np.sort(np.take_along_axis(ref, order, 1), axis=1), rtol=1e-5
        )
        assert np.all(top.rows[:3] == -1)  # heaps outside the given range untouched
    with pytest.raises(ValueError, match="alive mask"):
        search_inverted(inv, q, 0, 1, top.scores, top.rows, 0, 0, alive[:10])
    with pytest.raises(ValueError, match="tile"):
        build_inverted(x, 70_000)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 300),
    dim=st.integers(1, 24),
    density=st.floats(0.0, 1.0),
    n_queries=st.integers(1, 6),
    k=st.integers(1, 12),
    tile=st.integers(1, 70),
    seed=st.integers(0, 2**31),
)
def test_inverted_search_property(n, dim, density, n_queries, k, tile, seed):
    """Exact top-k, ties to the smaller row, on any shape. Values are multiples of 1/4, so every float32 sum is
    exact and ties are real ties, as they are for duplicated embeddings."""
    rng = np.random.default_rng(seed)

    def quarters(rows: int) -> sp.csr_matrix:
        m = rng.integers(1, 5, (rows, dim)) * (rng.random((rows, dim)) < density) / 4
        return sp.csr_matrix(m.astype(np.float32))

    x, q = quarters(n), quarters(n_queries)
    alive = rng.random(n) < 0.8
    top = RunningTopK(n_queries, k)
    search_inverted(build_inverted(x, tile), q, 0, n_queries, top.scores, top.rows, 0, 0, alive)
    ref = (q.toarray().astype(np.float64) @ x.toarray().T.astype(np.float64))[:, alive]
    live = np.flatnonzero(alive)
    for i in range(n_queries):
        want = live[np.argsort(-ref[i], kind="stable")[:k]]
        got = top.rows[i][top.rows[i] >= 0]
        assert sorted(got.tolist()) == sorted(want.tolist())
        assert np.array_equal(np.sort(top.scores[i][top.rows[i] >= 0]), np.sort(ref[i][np.searchsorted(live, want)]))


def test_compiled_loops_refuse_what_they_would_index_out_of_bounds():
    """The numba loops run without bounds checks; their Python entry points refuse bad shapes first."""
    inv = build_inverted(random_csr(50, 8, 0.3, seed=21))
    q = random_csr(4, 8, 0.3, seed=22)
    top = RunningTopK(4, 3)
    with pytest.raises(ValueError, match="dimensions"):
        search_inverted(inv, random_csr(4, 9, 0.3, seed=23), 0, 4, top.scores, top.rows, 0, 0)
    with pytest.raises(ValueError, match="query range"):
        search_inverted(inv, q, 0, 5, top.scores, top.rows, 0, 0)
    with pytest.raises(ValueError, match="heap rows"):
        search_inverted(inv, q, 0, 4, top.scores, top.rows, 1, 0)
    with pytest.raises(ValueError, match="float32"):
        search_inverted(inv, q, 0, 4, top.scores.astype(np.float64), top.rows, 0, 0)
    with pytest.raises(ValueError, match="k >= 1"):
        search_inverted(inv, q, 0, 4, top.scores[:, :0], top.rows[:, :0], 0, 0)
    with pytest.raises(ValueError, match="heap rows"):
        top.push(2, np.zeros((3, 5), np.float32), 0)
    bad = q.copy()
    bad.indices[0] = 8  # scipy accepts a column index past the shape until something reads it
    with pytest.raises(ValueError, match="column indices"):
        search_inverted(inv, bad, 0, 4, top.scores, top.rows, 0, 0)
    assert np.all(top.rows == -1)  # nothing was written by the refused calls


def test_csr_index_with_small_tiles_matches_brute_force(monkeypatch, data):
    """The index end to end over many tiles and blocks, with removals and replacements."""
    monkeypatch.setattr(inverted, "TILE_ROWS", 97)
    monkeypatch.setattr(csr_index, "SPLIT_MIN_WORK_NS", 0)  # single queries split the tiles between workers
    db, queries, ids = data
    index = CsrIndex(96, kernel="sparse", threads=2)
    for lo in range(0, db.shape[0], 400):
        index.add(ids[lo : lo + 400], db[lo : lo + 400])
    gone = ids[::7]
    index.remove(gone)
    index.add(ids[1:30:7], db[:5])  # replace five ids with other vectors
    keep = np.setdiff1d(np.arange(db.shape[0]), np.arange(db.shape[0])[::7])
    vectors = db.toarray()
    vectors[1:30:7] = db[:5].toarray()
    live = np.union1d(keep, np.arange(1, 30, 7))
    ref = brute_force(vectors[live], queries.toarray(), "ip")
    scores, found = index.search(queries, 10)
    assert all(b.inv is not None and b.inv.tile == 97 for b in index._blocks)
    assert_exact_topk(scores, found, ref, ids[live], 10)
    for i in range(6):  # one query, fewer than the workers: the tiles are split between them and merged
        one_scores, one_found = index.search(queries[i], 10)
        assert_exact_topk(one_scores, one_found, ref[i : i + 1], ids[live], 10)


def test_absorb_merges_partial_topks_and_stays_a_heap():
    rng = np.random.default_rng(24)
    scores = np.round(rng.random((5, 900)) * 8).astype(np.float32)  # few distinct values: many ties
    scores[:, [650, 700]] = [20, 9]  # rows pushed after the merge that must enter it
    whole, parts = RunningTopK(5, 7), [RunningTopK(5, 7) for _ in range(3)]
    for j, part in enumerate(parts):
        part.push(0, scores[:, j * 200 : (j + 1) * 200], j * 200)
    whole.absorb(parts)
    whole.push(0, scores[:, 600:], 600)  # still a valid heap: later rows keep streaming in
    order = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    assert np.array_equal(np.sort(whole.rows, axis=1), np.sort(order, axis=1))


def test_threads_do_not_change_results(data):
    db, queries, ids = data
    one = CsrIndex(96, kernel="sparse", threads=1)
    two = CsrIndex(96, kernel="sparse", threads=2)
    for index in (one, two):
        index.add(ids, db)
    a, b = one.search(queries, 10), two.search(queries, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
