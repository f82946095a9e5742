"""Synthetic sparse embeddings with uneven dimension popularity, shared by the engine benchmarks.

Learned sparse codes do not fire their dimensions uniformly: in the demo model's codes (and in the issue that
asked for this benchmark) the most popular dimensions are non-zero in 54%, 33% and 24% of the rows, a Zipf-like
law ``p(rank) ~ rank^-0.7``. Uniformly random positions (bench/bench_index.py) hide what that costs: popular
dimensions have long posting lists, and queries use them as often as the database does.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

ZIPF_EXPONENT = 0.7  # fitted to 54% / 33% / 24% for the top three dimensions (ratios 2^-0.7, 3^-0.7)
MAX_POPULARITY = 0.9


def zipf_popularity(d: int, density: float, seed: int = 0, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """Probability that each dimension is non-zero in a row: ``min(cap, c * rank^-exponent)`` with ``c`` set
    so that the mean is ``density``, over a random permutation of the dimensions (fixed by ``seed``)."""
    if not 0 < density <= MAX_POPULARITY:
        raise ValueError(f"density must be in (0, {MAX_POPULARITY}], got {density}")
    shape = np.arange(1, d + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, d / shape.sum() * 1e3
    for _ in range(100):  # bisection on c: the cap makes the mean a monotone, piecewise linear function
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(MAX_POPULARITY, c * shape).mean() < density else (lo, c)
    p = np.minimum(MAX_POPULARITY, (lo + hi) / 2 * shape)
    return p[np.random.default_rng(seed).permutation(d)]


def zipf_sparse(n: int, d: int, density: float, seed: int, *, popularity_seed: int = 0) -> sp.csr_matrix:
    """``n`` rows: dimension j non-zero with probability ``zipf_popularity(d, density)[j]``, values
    exponential(1) (a heavy-ish tail, like ReLU outputs); no row is empty. Database and queries share
    ``popularity_seed``.
    Built in chunks so that no dense n x d array exists."""
    p = zipf_popularity(d, density, popularity_seed).astype(np.float32)
    rng = np.random.default_rng(seed)
    parts = []
    step = max(1, (32 << 20) // (4 * d))
    for lo in range(0, n, step):
        m = min(step, n - lo)
        mask = rng.random((m, d), dtype=np.float32) < p
        empty = np.flatnonzero(~mask.any(axis=1))  # every row gets at least one dimension (drawn by popularity)
        mask[empty, rng.choice(d, empty.size, p=p / p.sum())] = True
        rows, cols = np.nonzero(mask)
        vals = rng.exponential(1.0, rows.size).astype(np.float32) + np.float32(1e-3)
        indptr = np.zeros(m + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
        parts.append(sp.csr_matrix((vals, cols.astype(np.int32), indptr), shape=(m, d)))
    out = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    out.indices = out.indices.astype(np.int32)
    return out
