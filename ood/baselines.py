"""Reference OOD detectors on the same embeddings, to say how much the index-free activation scores give up.

KNN (Sun et al. 2022) is the strong feature-space baseline but needs the training embeddings at scoring time;
the analytic-l0 deviation needs nothing but the model's target. (The Mahalanobis baseline is the served detector
on the code values, detectors.GaussianMahalanobis, fitted on all train embeddings.)
All follow the convention higher = more OOD.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse


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


def l0_deviation(l0: Any, expected_l0: float) -> NDArray[np.float64]:
    """|l0 - E[l0]| against the analytic rate the target fixes: needs no in-distribution data at all."""
    return np.abs(np.asarray(l0, dtype=np.float64) - float(expected_l0))
