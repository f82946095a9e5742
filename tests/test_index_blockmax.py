"""csr's block-max exact kernel (index.blockmax): results identical to the plain exact kernel (ties, removals,
cosine, several blocks), checked against a brute-force scipy reference, safe quantised bounds, the cost model's
choice and the probe that drops the structure where it does not pay, options that survive save/load."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_index_support import zipf_csr

from index import InvalidInputError, blockmax, create_index, load_index
from index.kernels import CostModel


@pytest.fixture
def small_blocks(monkeypatch):
    """Block-max structures on test-sized data: CSR blocks of 1,000+ rows, groups of 16 rows."""
    monkeypatch.setattr(blockmax, "MIN_ROWS", 1000)
    monkeypatch.setattr(blockmax, "BLOCK_ROWS", 16)


def _pair(x_parts, metric="ip", **options):
    """The same rows in a blockmax index and in a plain-kernel one (no block-max, no pruning)."""
    bmax = create_index("csr", x_parts[0].shape[1], metric, kernel="blockmax", **options)
    plain = create_index("csr", x_parts[0].shape[1], metric, kernel="sparse", blockmax_exact=False, pruned_exact=False)
    start = 0
    for part in x_parts:
        for index in (bmax, plain):
            index.add(np.arange(start, start + part.shape[0]), part)
        start += part.shape[0]
    return bmax, plain


def brute_force(x: sp.csr_matrix, alive_ids: np.ndarray, q: sp.csr_matrix, k: int) -> list[list[tuple]]:
    """float64 top-k (score, id) per query, ties by ascending id, zero scores included as the exact search
    returns them: the independent reference."""
    scores = (q.astype(np.float64) @ x.astype(np.float64).T).toarray()[:, alive_ids]
    out = []
    for row in scores:
        order = np.lexsort((alive_ids, -row))[:k]
        out.append([(row[i], alive_ids[i]) for i in order])
    return out


def _assert_identical(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_blockmax_kernel_returns_exactly_what_the_plain_one_does(small_blocks, metric):
    rng = np.random.default_rng(11)
    x = zipf_csr(6000, 96, 0.04, seed=4)
    ties = sp.csr_matrix((rng.random((2500, 96)) < 0.05) * rng.integers(1, 3, (2500, 96)), dtype=np.float32)
    q = sp.vstack([zipf_csr(120, 96, 0.04, seed=5), ties[:40]]).tocsr()
    bmax, plain = _pair([x, ties], metric)  # two CSR blocks with structures (6,000 and 2,500 rows)
    for index in (bmax, plain):
        index.remove(np.arange(0, 6000, 7))  # dead rows inside the first block
    structures = [bmax._blockmax(b) for b in bmax._blocks]
    assert len(structures) == 2 and all(s is not None for s in structures)
    for k in (1, 10, 40):
        a, b = bmax.search(q, k), plain.search(q, k)
        assert bmax.last_kernel == "blockmax"
        _assert_identical(a, b)
        assert not np.isin(a[1], np.arange(0, 6000, 7)).any()


def test_blockmax_prunes_and_agrees_with_brute_force(small_blocks):
    x = zipf_csr(8000, 128, 0.02, seed=6)
    q = zipf_csr(50, 128, 0.02, seed=7)
    bmax, _ = _pair([x])
    bmr = bmax._blockmax(bmax._blocks[0])
    scored = [blockmax.search_blockmax(bmr, q, i, i + 1, *_heaps(1, 10), 0, 0)[0] for i in range(q.shape[0])]
    assert np.median(scored) < 0.2 * x.shape[0]  # bounds do prune on skewed sparse data
    scores, ids = bmax.search(q, 10)
    for i, ref in enumerate(brute_force(x, np.arange(x.shape[0]), q, 10)):
        assert ids[i].tolist() == [r[1] for r in ref]
        np.testing.assert_allclose(scores[i], [r[0] for r in ref], rtol=1e-5)


def _heaps(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def test_zero_scores_fill_the_results_as_in_the_plain_kernel(small_blocks):
    """Queries sharing no dimension (or only one row's) with the data: the plain kernel returns zero-score rows
    by ascending id after the matches, so must block-max (it visits every block then)."""
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((3000, 40)) < 0.1, rng.random((3000, 40)), 0).astype(np.float32)
    dense[:, 30:] = 0  # dimensions 30-39: only row 1234 has one
    dense[1234, 35] = 2.0
    x = sp.csr_matrix(dense)
    q = sp.csr_matrix(np.eye(40, dtype=np.float32)[[35, 36]])
    q = sp.vstack([q, sp.csr_matrix((1, 40), dtype=np.float32)]).tocsr()  # and an all-zero query
    bmax, plain = _pair([x])
    for k in (1, 5, 20):
        _assert_identical(bmax.search(q, k), plain.search(q, k))
    assert bmax.search(q, 3)[1][0].tolist() == [1234, 0, 1]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1000, 4000),
    st.sampled_from([0.01, 0.05, 0.2]),
    st.integers(1, 15),
    st.sampled_from(["ip", "cosine"]),
    st.integers(0, 2**31 - 1),
)
def test_blockmax_property_against_plain_and_brute_force(n, density, k, metric, seed):
    saved = blockmax.MIN_ROWS, blockmax.BLOCK_ROWS
    blockmax.MIN_ROWS, blockmax.BLOCK_ROWS = 500, 8
    try:
        rng = np.random.default_rng(seed)
        # small integer values: many exact ties, which must go to the smaller id
        x = sp.csr_matrix(np.where(rng.random((n, 48)) < density, rng.integers(1, 4, (n, 48)), 0), dtype=np.float32)
        q = sp.csr_matrix(np.where(rng.random((6, 48)) < 0.3, rng.integers(1, 3, (6, 48)), 0), dtype=np.float32)
        cut = int(rng.integers(500, n))
        bmax, plain = _pair([x[:cut], x[cut:]] if n - cut >= 1 else [x], metric)
        dead = np.unique(rng.integers(0, n, n // 10))
        for index in (bmax, plain):
            index.remove(dead)
        a, b = bmax.search(q, k), plain.search(q, k)
        _assert_identical(a, b)
        if metric == "ip":
            alive = np.setdiff1d(np.arange(n), dead)
            for i, ref in enumerate(brute_force(x, alive, q, k)):
                assert a[1][i][: len(ref)].tolist() == [r[1] for r in ref]
    finally:
        blockmax.MIN_ROWS, blockmax.BLOCK_ROWS = saved


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-30, 1e-3, 1.0, 7.3, 3e4]))
def test_quantised_bounds_never_fall_below_the_values(seed, magnitude):
    rng = np.random.default_rng(seed)
    maxima = (rng.random((20, 50)) * magnitude).astype(np.float32)
    maxima[rng.random((20, 50)) < 0.3] = 0
    maxima[3] = 0  # a dimension no row has
    q, scale = blockmax.quantise_up(maxima)
    assert q.dtype == np.uint8 and scale.dtype == np.float32
    assert np.all(q.astype(np.float64) * scale.astype(np.float64)[:, None] >= maxima.astype(np.float64))
    assert np.all((q == 0) == (maxima == 0))


def test_cost_model_picks_blockmax_where_the_probe_says_it_pays(small_blocks):
    x = zipf_csr(20_000, 256, 0.02, seed=8)
    q = zipf_csr(20, 256, 0.02, seed=9)
    index = create_index("csr", 256, costs=CostModel(blockmax_per_row=10.0))  # rows priced as at 100k rows
    index.add(np.arange(x.shape[0]), x)
    index.prepare()
    bmr = index._blocks[0].bmax
    assert bmr is not None and 0 < bmr.rows_per_query < 0.2 * x.shape[0]
    assert index.choose_kernel(q[:1]) == "blockmax"
    # rows priced so high that the structure never pays: dropped at build (no memory kept), the sparse kernel
    costly = create_index("csr", 256, costs=CostModel(blockmax_per_row=1e6))
    costly.add(np.arange(x.shape[0]), x)
    costly.prepare()
    assert costly._blocks[0].bmax is None and costly._blocks[0].bmax_checked
    assert costly.choose_kernel(q[:1]) == "sparse"
    _assert_identical(index.search(q, 10), costly.search(q, 10))


def test_probe_gives_up_where_bounds_do_not_prune():
    """Dense-ish rows of equal values: every group bound is the same, nothing is skipped, the probe stops."""
    x = sp.csr_matrix(np.ones((4000, 16), np.float32))
    bmr = blockmax.build_blockmax(x, 16)
    assert bmr.rows_per_query == x.shape[0]
    # the abandoned probe left this thread's buffers clean: a later search here is still exact
    y = zipf_csr(3000, 16, 0.2, seed=12)
    q = zipf_csr(5, 16, 0.2, seed=13)
    scores, rows = _heaps(q.shape[0], 3)
    blockmax.search_blockmax(blockmax.build_blockmax(y, 8), q, 0, q.shape[0], scores, rows, 0, 0)
    for i, ref in enumerate(brute_force(y, np.arange(y.shape[0]), q, 3)):
        assert sorted(rows[i].tolist()) == sorted(r[1] for r in ref)


def test_options_survive_save_and_load(small_blocks, tmp_path):
    x = zipf_csr(3000, 64, 0.05, seed=10)
    q = zipf_csr(30, 64, 0.05, seed=11)
    off = create_index("csr", 64, blockmax_exact=False)
    on = create_index("csr", 64)
    for index, name in ((off, "off"), (on, "on")):
        index.add(np.arange(x.shape[0]), x)
        index.save(tmp_path / name)
    loaded_off, loaded_on = load_index(tmp_path / "off"), load_index(tmp_path / "on")
    assert loaded_off.blockmax_exact is False and loaded_on.blockmax_exact is True
    assert loaded_off._blockmax(loaded_off._blocks[0]) is None
    _assert_identical(loaded_on.search(q, 10), off.search(q, 10))


def test_approximate_indexes_do_not_build_it(small_blocks):
    """Their exact searches (tuning, mode="exact" calls) take the inverted index: no second structure to hold."""
    x = zipf_csr(3000, 64, 0.05, seed=14)
    index = create_index("csr", 64, mode="approx")
    index.add(np.arange(x.shape[0]), x)
    index.prepare()
    index.search(x[:5], 10, mode="exact")
    assert index._blocks[0].bmax is None and index.last_kernel != "blockmax"


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_option_is_refused(bad):
    with pytest.raises(InvalidInputError, match="blockmax_exact"):
        create_index("csr", 8, blockmax_exact=bad)


def test_kernel_checks_query_columns():
    x = sp.csr_matrix(np.eye(8, dtype=np.float32))
    bmr = blockmax.build_blockmax(x, 2)
    outside = sp.csr_matrix((np.array([1.0], np.float32), np.array([9], np.int32), np.array([0, 1])), shape=(1, 8))
    with pytest.raises(ValueError, match="outside"):
        blockmax.search_blockmax(bmr, outside, 0, 1, *_heaps(1, 3), 0, 0)
