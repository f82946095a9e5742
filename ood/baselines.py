"""Reference OOD detectors on the same embeddings, to say how much the index-free activation scores give up.

KNN (Sun et al. 2022) is the strong feature-space baseline but needs the training embeddings at scoring time;
Mahalanobis needs a D x D precision matrix; the analytic-l0 deviation needs nothing but the model's target.
All follow the convention higher = more OOD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import linalg, sparse


def dense(embeddings: Any) -> NDArray[np.float32]:
    """C-contiguous float32 rows, the layout faiss wants."""
    arr = embeddings.toarray() if sparse.issparse(embeddings) else np.asarray(embeddings)
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N x dim), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def l2_normalize(x: NDArray[Any]) -> NDArray[np.float32]:
    """Unit rows; an all-zero row (possible for very sparse codes) stays zero, i.e. similarity 0 to everything."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class KNNDistance:
    """Negative cosine similarity to the k-th nearest training embedding (k = 50 on L2-normalised features).

    On unit vectors ||u - v||^2 = 2 - 2 u.v, so ranking by -(k-th similarity) is ranking by the k-th distance.
    """

    def __init__(self, k: int = 50) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = int(k)
        self.index: Any = None

    def fit(self, train: Any) -> KNNDistance:
        import faiss

        x = l2_normalize(dense(train))
        if x.shape[0] < self.k:
            raise ValueError(f"KNN with k={self.k} needs at least {self.k} training embeddings, got {x.shape[0]}")
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)
        return self

    def score(self, x: Any) -> NDArray[np.float64]:
        if self.index is None:
            raise RuntimeError("KNNDistance.fit must be called before score")
        q = l2_normalize(dense(x))
        if q.shape[1] != self.index.d:
            raise ValueError(f"embeddings have {q.shape[1]} dimensions; the KNN index has {self.index.d}")
        sims, _ = self.index.search(q, self.k)
        return -sims[:, -1].astype(np.float64)


def ledoit_wolf(x: NDArray[Any]) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """(mean, shrunk covariance, shrinkage) with the Ledoit-Wolf (2004) optimal shrinkage toward m * I.

    Rectified codes have dimensions that are almost never active, which makes the sample covariance singular;
    shrinkage toward a scaled identity keeps the precision matrix finite without a hand-tuned ridge.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    m = float(np.trace(s)) / p
    # Frobenius norms scaled by 1/p, as in the paper's notation <A, B> = tr(A B^T) / p.
    d2 = float(np.sum((s - m * np.eye(p)) ** 2)) / p
    x2 = xc**2
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2
    b_bar2 = (float(np.sum(np.sum(x2, axis=1) ** 2)) - n * float(np.sum(s**2))) / (n**2 * p)
    b2 = min(b_bar2, d2)
    shrinkage = 0.0 if d2 <= 0 else b2 / d2
    cov = (1.0 - shrinkage) * s + shrinkage * m * np.eye(p)
    return mean, cov, shrinkage


@dataclass
class Mahalanobis:
    """Class-agnostic Mahalanobis distance to a single Gaussian fitted to in-distribution training embeddings."""

    mean: NDArray[np.float64] | None = None
    precision_factor: Any = None
    shrinkage: float = 0.0

    def fit(self, train: Any) -> Mahalanobis:
        x = dense(train).astype(np.float64)
        if x.shape[0] < 2:
            raise ValueError("Mahalanobis needs at least 2 training embeddings")
        self.mean, cov, self.shrinkage = ledoit_wolf(x)
        # A model whose codes are all zero (or constant) has zero variance: a tiny ridge keeps Cholesky defined.
        cov = cov + 1e-9 * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
        self.precision_factor = linalg.cho_factor(cov, lower=True)
        return self

    def score(self, x: Any) -> NDArray[np.float64]:
        if self.mean is None:
            raise RuntimeError("Mahalanobis.fit must be called before score")
        xc = dense(x).astype(np.float64) - self.mean
        if xc.shape[1] != self.mean.size:
            raise ValueError(f"embeddings have {xc.shape[1]} dimensions; the Gaussian has {self.mean.size}")
        solved = linalg.cho_solve(self.precision_factor, xc.T)
        return np.einsum("ij,ji->i", xc, solved)


def l0_deviation(l0: Any, expected_l0: float) -> NDArray[np.float64]:
    """|l0 - E[l0]| against the analytic rate the target fixes: needs no in-distribution data at all."""
    return np.abs(np.asarray(l0, dtype=np.float64) - float(expected_l0))
