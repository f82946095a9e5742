"""Shared helpers for the index tests (no tests here): random sparse data (uniform and Zipf-like popularity) and a
brute-force reference check."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def random_csr(n: int, d: int, density: float, seed: int, *, zero_rows: int = 0) -> sp.csr_matrix:
    """Non-negative random rows with about ``density`` of the entries non-zero (uniform(0, 1] values)."""
    rng = np.random.default_rng(seed)
    u = rng.random((n, d), dtype=np.float32)
    x = np.where(u < density, u / density, 0).astype(np.float32)
    if zero_rows:
        x[rng.choice(n, zero_rows, replace=False)] = 0
    return sp.csr_matrix(x)


def zipf_csr(n: int, d: int, density: float, seed: int, exponent: float = 0.7) -> sp.csr_matrix:
    """Rows whose dimension j is non-zero with probability ~ rank(j)^-exponent (same ranks for every call), values
    exponential(1): the uneven popularity of learned codes, where the long posting lists are the common ones."""
    shape = np.arange(1, d + 1, dtype=np.float64) ** -exponent
    p = np.minimum(0.9, shape * density * d / shape.sum())[np.random.default_rng(0).permutation(d)]
    rng = np.random.default_rng(seed)
    mask = rng.random((n, d)) < p
    mask[np.flatnonzero(~mask.any(axis=1)), 0] = True
    x = np.where(mask, rng.exponential(1.0, (n, d)) + 1e-3, 0).astype(np.float32)
    return sp.csr_matrix(x)


def brute_force(db: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """All query x database scores in float64, the reference every exact backend must reproduce."""
    db = np.asarray(db, np.float64)
    queries = np.asarray(queries, np.float64)
    if metric == "cosine":
        db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-300)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    return queries @ db.T


def assert_exact_topk(
    scores: np.ndarray, ids: np.ndarray, ref: np.ndarray, ref_ids: np.ndarray, k: int, tol: float = 1e-4
) -> None:
    """Identical top-k up to ties.

    ``ref`` holds the reference scores of every (query, database row) and ``ref_ids`` the id of each row.
    Checks: the returned scores are the k best reference values (same values, best first); each returned id
    really has the returned score; every id whose reference score beats the k-th best by more than ``tol`` is
    returned. Only rows tied (within ``tol``) at the k-th place may differ from any other correct answer.
    """
    n = ref.shape[1]
    kk = min(k, n)
    assert scores.shape == ids.shape == (ref.shape[0], k)
    col_of = {int(i): c for c, i in enumerate(ref_ids)}
    for q in range(ref.shape[0]):
        best = np.sort(ref[q])[::-1][:kk]
        np.testing.assert_allclose(scores[q, :kk], best, rtol=tol, atol=tol)
        assert np.all(np.diff(scores[q, :kk]) <= 1e-6), "scores must be sorted best first"
        got = ids[q, :kk]
        assert len(set(got.tolist())) == kk, "duplicate ids in one result row"
        actual = np.array([ref[q, col_of[int(i)]] for i in got])
        np.testing.assert_allclose(scores[q, :kk], actual, rtol=tol, atol=tol)
        must = {int(ref_ids[c]) for c in np.flatnonzero(ref[q] > best[-1] + tol)}
        assert must <= set(got.tolist()), f"query {q}: ids beating the k-th score are missing"
        if k > kk:  # fewer stored vectors than k: the tail is empty
            assert np.all(ids[q, kk:] == -1) and np.all(np.isneginf(scores[q, kk:]))
