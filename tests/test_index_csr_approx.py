"""csr's approximate mode (index.approx): recall against the exact search on skewed synthetic and real embeddings,
exact scores and the tie rule, the exact mode left as it was, options that survive save/load, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_index_support import random_csr, zipf_csr

from index import InvalidInputError, create_index, load_index
from index.approx import build_impact, sort_by_impact, top_rows_per_dim
from index.base import _finish
from index.inverted import build_inverted
from index.validation import check_vectors


def recall_with_ties(found_scores: np.ndarray, exact_scores: np.ndarray) -> float:
    """Share of the true top-k (positive scores only) matched by a returned score at least the true k-th."""
    out = []
    for f, e in zip(found_scores, exact_scores, strict=True):
        e = e[e > 0]
        if e.size:
            out.append(min(int((f >= e.min() - 1e-6).sum()), e.size) / e.size)
    return float(np.mean(out))


def exact_scores_of(x: sp.csr_matrix, q: sp.csr_matrix, ids: np.ndarray) -> np.ndarray:
    """float64 inner products of each query with the rows it got back (-inf for empty slots)."""
    out = np.full(ids.shape, -np.inf)
    for i in range(ids.shape[0]):
        ok = ids[i] >= 0
        out[i, ok] = x[ids[i, ok]].astype(np.float64) @ q[i].toarray().ravel().astype(np.float64)
    return out


def build_pair(x: sp.csr_matrix, metric: str = "ip", **options):
    exact = create_index("csr", x.shape[1], metric)
    exact.add(np.arange(x.shape[0]), x)
    approx = create_index("csr", x.shape[1], metric, mode="approx", **options)
    approx.add(np.arange(x.shape[0]), x)
    approx.prepare()
    return exact, approx


@pytest.fixture(scope="module")
def zipf():
    d = 256
    return zipf_csr(40_000, d, 0.03, seed=1), zipf_csr(300, d, 0.03, seed=2), zipf_csr(200, d, 0.03, seed=3)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_recall_on_zipf_data_with_default_settings(zipf, metric):
    x, q, _ = zipf
    exact, approx = build_pair(x, metric)
    es, _ = exact.search(q, 10)
    fs, fi = approx.search(q, 10)
    assert approx.last_kernel == "approx"  # the approximate kernel really ran
    assert recall_with_ties(fs, es) >= 0.997
    # returned scores are the exact inner products of the returned rows, best first
    ref = exact_scores_of(exact.reconstruct(np.arange(x.shape[0])) if metric == "ip" else _unit(x), _q(q, metric), fi)
    np.testing.assert_allclose(fs, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(fs, axis=1) <= 0)


def _unit(x: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(1 / np.maximum(norms, 1e-30)) @ x)


def _q(q: sp.csr_matrix, metric: str) -> sp.csr_matrix:
    return _unit(q) if metric == "cosine" else q


def test_pruning_does_prune_and_recall_falls_only_with_the_cut(zipf):
    """A large cut must lose some recall (otherwise the test could not see a broken bound), cut 0 none."""
    x, q, _ = zipf
    exact, approx = build_pair(x)
    es, ei = exact.search(q, 10)
    recalls = {}
    for cut, slack in ((1.0, 0.0), (0.2, 3.0), (0.0, 0.0)):
        approx.approx_cut, approx.approx_slack = cut, slack
        fs, fi = approx.search(q, 10)
        recalls[cut] = recall_with_ties(fs, es)
        if cut == 0.0:  # exact: the very same ids and scores as the exact mode
            np.testing.assert_array_equal(fi, ei)
            np.testing.assert_array_equal(fs, es)
    assert recalls[1.0] < 0.99 <= recalls[0.2] and recalls[0.0] == 1.0


def test_tune_approx_reaches_the_target_on_new_queries(zipf):
    x, q, tune_q = zipf
    exact, approx = build_pair(x)
    report = approx.tune_approx(tune_q, 10, target_recall=0.995)
    assert report["param"] == "approx_cut" and report["recall"] >= 0.995
    assert approx.approx_cut == report["value"] and approx.approx_slack == report["slack"]
    assert len(report["tried"]) > 1
    assert recall_with_ties(approx.search(q, 10)[0], exact.search(q, 10)[0]) >= 0.99


def test_ties_go_to_the_smaller_id_as_in_the_exact_mode():
    """Integer scores, most results tied: the approximate kernel meets rows in no particular order (probe
    first, then per tile in posting order), yet must order equal scores by id and keep the smallest ids among
    rows tied at the k-th place, exactly as the exact mode does."""
    rng = np.random.default_rng(5)
    x = sp.csr_matrix((rng.random((30_000, 64)) < 0.08) * rng.integers(1, 4, (30_000, 64)), dtype=np.float32)
    q = sp.csr_matrix((rng.random((100, 64)) < 0.3).astype(np.float32))
    q = q[np.diff(q.indptr) > 0]
    exact, approx = build_pair(x, approx_cut=0.05, approx_slack=3.0)  # cut below every value: nothing pruned
    es, ei = exact.search(q, 10)
    fs, fi = approx.search(q, 10)
    assert approx.last_kernel == "approx"
    np.testing.assert_array_equal(fi, ei)
    np.testing.assert_array_equal(fs, es)
    approx.approx_cut = 0.3  # pruning now (a row tied at the k-th place may be missed): equal scores still by id
    fs, fi = approx.search(q, 10)
    np.testing.assert_array_equal(fs, exact_scores_of(x, q, fi).astype(np.float32))
    tied = (np.diff(fs, axis=1) == 0) & (fi[:, 1:] >= 0)
    assert tied.any() and np.all(np.diff(fi, axis=1)[tied] > 0)
    assert recall_with_ties(fs, es) >= 0.9


def test_removed_ids_never_come_back_and_new_blocks_are_searched(zipf):
    x, q, _ = zipf
    approx = create_index("csr", x.shape[1], "ip", mode="approx", compact_ratio=1.0)
    approx.add(np.arange(30_000), x[:30_000])
    approx.add(np.arange(30_000, x.shape[0]), x[30_000:])  # a second block
    gone = approx.search(q[:50], 10)[1][:, :3].ravel()
    approx.remove(np.unique(gone))
    exact = create_index("csr", x.shape[1], "ip")
    keep = np.setdiff1d(np.arange(x.shape[0]), gone)
    exact.add(keep, x[keep])
    fs, fi = approx.search(q, 10)
    assert not np.isin(fi, gone).any()
    assert recall_with_ties(fs, exact.search(q, 10)[0]) >= 0.997


def test_exact_mode_is_the_default_and_unchanged(zipf):
    x, q, _ = zipf
    exact, approx = build_pair(x)
    assert create_index("csr", 8).mode == "exact"
    es, ei = exact.search(q, 10)
    assert exact.last_kernel != "approx"
    for scores, ids in (approx.search(q, 10, mode="exact"), exact.search(q, 10, mode="exact")):
        np.testing.assert_array_equal(ids, ei)
        np.testing.assert_array_equal(scores, es)
    fs, _ = exact.search(q, 10, mode="approx")  # per call, on an exact index
    assert exact.last_kernel == "approx" and recall_with_ties(fs, es) >= 0.997


def test_options_survive_save_and_load(zipf, tmp_path):
    x, q, _ = zipf
    _, approx = build_pair(x, approx_cut=0.3, approx_slack=2.0)
    before = approx.search(q, 10)
    approx.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert (loaded.mode, loaded.approx_cut, loaded.approx_slack) == ("approx", 0.3, 2.0)
    after = loaded.search(q, 10)  # impact lists are rebuilt from the saved rows, deterministically
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize(
    "options",
    [{"mode": "fast"}, {"approx_cut": 1.5}, {"approx_cut": -0.1}, {"approx_slack": -1.0}, {"approx_cut": "0.2"}],
)
def test_bad_settings_are_refused(options):
    with pytest.raises(InvalidInputError):
        create_index("csr", 8, **options)


def test_bad_call_mode_is_refused():
    index = create_index("csr", 8)
    index.add([1], np.ones((1, 8)))
    with pytest.raises(InvalidInputError, match="mode"):
        index.search(np.ones((1, 8)), 1, mode="quick")


def test_impact_order_and_top_rows():
    x = random_csr(3000, 40, 0.2, seed=7)
    inv = build_inverted(x, tile=1000)
    imp = sort_by_impact(inv)
    top = top_rows_per_dim(imp, 5)
    col = x.tocsc()
    for j in range(40):
        for t in range(inv.n_tiles):
            a, b = inv.indptr[t * 40 + j], inv.indptr[t * 40 + j + 1]
            vals = imp.data[a:b]
            assert np.all(np.diff(vals) <= 0)  # descending
            assert sorted(zip(imp.rows[a:b].tolist(), vals.tolist(), strict=True)) == sorted(
                zip(inv.rows[a:b].tolist(), inv.data[a:b].tolist(), strict=True)
            )  # the same entries
        values = col.data[col.indptr[j] : col.indptr[j + 1]]
        rows = col.indices[col.indptr[j] : col.indptr[j + 1]]
        order = np.lexsort((rows, -values))[:5]
        np.testing.assert_array_equal(top[j, : order.size], rows[order])
    assert build_impact(x).top_rows.shape[0] == 40


@pytest.mark.slow
def test_recall_on_real_embeddings(model_path, fmnist):
    """Real Fashion-MNIST images through the (untrained) tiny exported encoder: real activation statistics."""
    from export.runtime import EmbeddingRuntime

    emb = EmbeddingRuntime(model_path).embed([fmnist[i][0] for i in range(3000)])
    x, q = emb[:2700], emb[2700:]
    exact, approx = build_pair(x, "cosine", approx_cut=0.05, approx_slack=3.0)
    es, _ = exact.search(q, 10)
    fs, _ = approx.search(q, 10)
    assert recall_with_ties(fs, es) >= 0.997


# ------------------------------------------------------------------ the single-query fast paths


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
)
def test_compiled_finish_matches_the_reference_order(n, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.choice([0.5, 1.0, 2.0, np.inf, -np.inf, np.nan], size=(n, k)).astype(np.float32)
    ids = rng.integers(-1, 6, size=(n, k))
    got_s, got_i = _finish(scores, ids)
    ref_s, ref_i = _reference_finish(scores, ids)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_array_equal(got_s, ref_s)


def _reference_finish(scores, ids):
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64).copy()
    empty = ~np.isfinite(scores) | (ids < 0)
    scores = np.where(empty, np.float32(-np.inf), scores)
    ids[empty] = -1
    tie_key = np.where(empty, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_key, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def test_clean_queries_are_not_copied_and_bad_ones_still_fail():
    q = sp.csr_matrix(np.array([[0, 1.5, 0, 2.0]], np.float32))
    q.indices = q.indices.astype(np.int32)
    assert check_vectors(q, 4, copy=False) is q
    assert check_vectors(q, 4) is not q
    for data, match in (([np.nan, 1.0], "NaN"), ([-1.0, 1.0], "negative")):
        bad = sp.csr_matrix((np.array(data, np.float32), np.array([1, 3], np.int32), np.array([0, 2])), shape=(1, 4))
        with pytest.raises(InvalidInputError, match=match):
            check_vectors(bad, 4, copy=False)
    unsorted = sp.csr_matrix((np.array([1.0, 2.0], np.float32), np.array([3, 1], np.int32), np.array([0, 2])), (1, 4))
    fixed = check_vectors(unsorted, 4, copy=False)
    assert fixed is not unsorted and fixed.indices.tolist() == [1, 3] and fixed.data.tolist() == [2.0, 1.0]
    stored_zero = sp.csr_matrix(
        (np.array([0.0, 2.0], np.float32), np.array([0, 1], np.int32), np.array([0, 2])), (1, 4)
    )
    assert check_vectors(stored_zero, 4, copy=False).nnz == 1
    index = create_index("csr", 4)
    index.add([7], np.ones((1, 4)))
    outside = sp.csr_matrix((np.array([1.0], np.float32), np.array([9], np.int32), np.array([0, 1])), shape=(1, 4))
    with pytest.raises(InvalidInputError):
        index.search(outside, 1)


# ------------------------------------------------------------------ the exact mode's pruned kernel


@pytest.fixture
def small_tiles(monkeypatch):
    """Make the pruned exact kernel run on test-sized data: 512-row tiles, blocks of 2,000+ rows pruned."""
    from index import approx, inverted

    monkeypatch.setattr(inverted, "TILE_ROWS", 512)
    monkeypatch.setattr(approx, "SAFE_MIN_ROWS", 2000)


def _both(x, metric="ip", **options):
    out = []
    for pruned in (True, False):
        index = create_index("csr", x.shape[1], metric, pruned_exact=pruned, kernel="sparse", **options)
        out.append(index)
    return out


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_pruned_exact_kernel_returns_exactly_what_the_plain_one_does(small_tiles, metric):
    rng = np.random.default_rng(11)
    x = zipf_csr(12_000, 96, 0.05, seed=4)
    ties = sp.csr_matrix((rng.random((3000, 96)) < 0.05) * rng.integers(1, 3, (3000, 96)), dtype=np.float32)
    q = sp.vstack([zipf_csr(120, 96, 0.05, seed=5), ties[:40]]).tocsr()
    pruned, plain = _both(x, metric)
    for index in (pruned, plain):
        index.add(np.arange(x.shape[0]), x)
        index.add(np.arange(50_000, 53_000), ties)  # a second block, of tied integer scores
        index.remove(np.arange(0, 12_000, 7))  # dead rows inside the pruned block
    assert pruned._pruned(pruned._blocks[0]) and not plain._pruned(plain._blocks[0])
    for k in (1, 10, 40):
        a, b = pruned.search(q, k), plain.search(q, k)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.isin(a[1], np.arange(0, 12_000, 7)).any()


@settings(max_examples=25, deadline=None)
@given(st.integers(2000, 5000), st.sampled_from([0.01, 0.05, 0.2]), st.integers(1, 15), st.integers(0, 2**31 - 1))
def test_pruned_exact_kernel_property(n, density, k, seed):
    from index import approx, inverted

    saved = inverted.TILE_ROWS, approx.SAFE_MIN_ROWS
    inverted.TILE_ROWS, approx.SAFE_MIN_ROWS = 700, 1000
    try:
        rng = np.random.default_rng(seed)
        x = sp.csr_matrix(np.where(rng.random((n, 48)) < density, rng.integers(1, 4, (n, 48)), 0), dtype=np.float32)
        q = sp.csr_matrix(np.where(rng.random((6, 48)) < 0.3, rng.random((6, 48)), 0), dtype=np.float32)
        pruned, plain = _both(x)
        for index in (pruned, plain):
            index.add(np.arange(n), x)
        a, b = pruned.search(q, k), plain.search(q, k)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    finally:
        inverted.TILE_ROWS, approx.SAFE_MIN_ROWS = saved


def test_cost_model_picks_the_sparse_kernel_on_skewed_data():
    """The case issue 18 reported: the uniform-only fit sent skewed 5% batches to spdense, 1.5-1.7x slower.
    Work estimates only (no timing): 100k x 512 at 5% with Zipf popularity, batches of 1 and 100."""
    x = zipf_csr(100_000, 512, 0.05, seed=8)
    q = zipf_csr(100, 512, 0.05, seed=9)
    index = create_index("csr", 512)
    index.add(np.arange(x.shape[0]), x)
    assert index.choose_kernel(q) == "sparse"
    assert index.choose_kernel(q[:1]) == "sparse"


def test_fill_index_tunes_a_csr_approx_index_on_held_back_rows(zipf):
    """The CLI's path (`lpjepa index build --csr-mode approx`): held-back rows are the tuning queries, then added."""
    from index.cli import fill_index

    x, q, _ = zipf
    index = create_index("csr", x.shape[1], "ip", mode="approx")
    chunks = [(np.arange(lo, lo + 10_000), x[lo : lo + 10_000], None) for lo in range(0, x.shape[0], 10_000)]
    summary = fill_index(index, chunks, total=x.shape[0], target_recall=0.99, tune_queries=150)
    assert summary["count"] == len(index) == x.shape[0]
    assert summary["tuned"]["param"] == "approx_cut" and summary["tuned"]["recall"] >= 0.99
    assert "tried" not in summary["tuned"]
    exact = create_index("csr", x.shape[1], "ip")
    exact.add(np.arange(x.shape[0]), x)
    assert recall_with_ties(index.search(q, 10)[0], exact.search(q, 10)[0]) >= 0.98
