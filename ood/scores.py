"""Activation-statistics OOD scores: how unusual an input's activation rate and firing pattern are.

The method fixes the expected activation rate by design, so the in-distribution spread of l0 (fraction of
active dimensions) and the per-dimension firing frequencies are stable, known quantities. An input whose l0 falls
in the tails of that spread, or whose pattern of firing dimensions is unlikely under the per-dimension rates, is
flagged without any index or label: scoring costs one pass over the non-zeros of the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.special import log_ndtr, logsumexp

from ood.schema import Calibration, CalibrationError, parse_calibration

SCORE_NAMES = ("rate", "pattern", "combined")
_CHUNK = 2048  # rows per block in the kernel CDF: bounds memory at _CHUNK x knots float64


def code_matrix(embeddings: sparse.spmatrix | sparse.sparray | NDArray[Any]) -> sparse.csr_matrix:
    """The codes as a float64 CSR copy (a 1-D vector is one input), refused when no score could use them."""
    if sparse.issparse(embeddings):
        mat = sparse.csr_matrix(embeddings, dtype=np.float64, copy=True)
    else:
        arr = np.asarray(embeddings)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N x dim), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"embeddings must be numeric, got dtype {arr.dtype}")
        mat = sparse.csr_matrix(arr.astype(np.float64))
    if mat.nnz and not np.all(np.isfinite(mat.data)):
        raise ValueError("embeddings contain NaN or infinite values")
    return mat


def activation_matrix(embeddings: sparse.spmatrix | sparse.sparray | NDArray[Any]) -> sparse.csr_matrix:
    """The binary 'which dimensions fire' matrix as CSR, whatever form the embeddings come in.

    Explicit zeros stored in a CSR are dropped: a dimension is active only when its value is non-zero, which is
    the definition of l0 the method reports.
    """
    mat = code_matrix(embeddings)
    mat.data = (mat.data != 0).astype(np.float64)
    mat.eliminate_zeros()
    return mat


def l0_fraction(active: sparse.csr_matrix) -> NDArray[np.float64]:
    """Fraction of active dimensions per row of an activation matrix."""
    return np.diff(active.indptr).astype(np.float64) / max(active.shape[1], 1)


@dataclass(frozen=True)
class SmoothedECDF:
    """A Gaussian-kernel-smoothed empirical CDF, evaluated in log space.

    A raw ECDF is a step function that is exactly 0 or 1 outside the calibration range, so every input beyond it
    would get the same (infinite or capped) score and far-out inputs could not be ranked. The kernel CDF
    F(x) = mean_i Phi((x - x_i) / h) interpolates between knots and has Gaussian tails whose log stays finite
    (scipy's log_ndtr), so the tail score keeps growing with the distance from the in-distribution range.
    """

    knots: NDArray[np.float64]
    bandwidth: float

    @classmethod
    def fit(cls, values: NDArray[Any], *, max_knots: int = 1024, min_bandwidth: float = 0.0) -> SmoothedECDF:
        """Silverman's rule for h, floored at `min_bandwidth` (l0 moves in steps of 1/D, so h below half a step
        only resolves the lattice), and the sample compressed to at most `max_knots` evenly spaced quantiles."""
        x = np.sort(np.asarray(values, dtype=np.float64).ravel())
        if x.size == 0:
            raise CalibrationError("cannot fit an l0 distribution to zero samples")
        sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
        iqr = float(np.subtract(*np.quantile(x, [0.75, 0.25])))
        spread = min(sd, iqr / 1.34) if iqr > 0 else sd
        h = 0.9 * spread * x.size ** (-0.2)
        h = max(h, float(min_bandwidth), 1e-12)
        if x.size > max_knots:
            x = np.quantile(x, (np.arange(max_knots) + 0.5) / max_knots)
        return cls(knots=x, bandwidth=h)

    def log_cdf_sf(self, x: NDArray[Any]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(log F(x), log (1 - F(x))), each accurate far into its tail."""
        x = np.asarray(x, dtype=np.float64).ravel()
        log_f = np.empty_like(x)
        log_s = np.empty_like(x)
        log_n = math.log(self.knots.size)
        for start in range(0, x.size, _CHUNK):
            z = (x[start : start + _CHUNK, None] - self.knots[None, :]) / self.bandwidth
            log_f[start : start + _CHUNK] = logsumexp(log_ndtr(z), axis=1) - log_n
            log_s[start : start + _CHUNK] = logsumexp(log_ndtr(-z), axis=1) - log_n
        return log_f, log_s

    def cdf(self, x: NDArray[Any]) -> NDArray[np.float64]:
        return np.exp(self.log_cdf_sf(x)[0])

    def two_sided_score(self, x: NDArray[Any]) -> NDArray[np.float64]:
        """-log(2 min(F, 1 - F)): 0 at the median, +log(1/p) for a two-sided tail probability p.

        On in-distribution inputs the tail probability is about uniform, so this score is about Exp(1).
        """
        log_f, log_s = self.log_cdf_sf(x)
        return np.maximum(-(math.log(2.0) + np.minimum(log_f, log_s)), 0.0)


@dataclass
class OODScores:
    """Per-input scores; higher means more out-of-distribution. `l0` is the fraction of active dimensions."""

    score: NDArray[np.float64]
    l0: NDArray[np.float64]
    is_ood: NDArray[np.bool_]
    rate_score: NDArray[np.float64]
    pattern_score: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.score.size)

    def to_records(self) -> list[dict[str, float | bool]]:
        """Plain-Python records (JSON-ready), one per input, in input order."""
        return [
            {"score": float(s), "l0": float(l), "is_ood": bool(o), "rate_score": float(r), "pattern_score": float(p)}
            for s, l, o, r, p in zip(self.score, self.l0, self.is_ood, self.rate_score, self.pattern_score, strict=True)
        ]

    def by_name(self, name: str) -> NDArray[np.float64]:
        """The score array named as in reports: 'rate', 'pattern' or 'combined'."""
        return {"rate": self.rate_score, "pattern": self.pattern_score, "combined": self.score}[name]


class OODScorer:
    """Scores embeddings against a stored in-distribution calibration (see `calibration.calibrate`).

    rate score     -log(2 min(F, 1 - F)) of the input's l0 under the smoothed in-distribution CDF F of l0.
    pattern score  -(1/D) sum_j [a_j log r_j + (1 - a_j) log(1 - r_j)]: the negative log-likelihood per dimension
                   of the firing pattern a under independent Bernoulli(r_j) dimensions (Laplace-smoothed r_j).
    combined       mean of the two, each z-scored by its distribution on held-out in-distribution data, so
                   neither dominates by scale; `threshold` on it keeps the calibrated in-distribution TPR.
    """

    def __init__(
        self,
        *,
        dim: int,
        rates: NDArray[Any],
        l0_cdf: SmoothedECDF,
        norm: dict[str, tuple[float, float]],
        thresholds: dict[str, float],
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.dim = int(dim)
        self.rates = np.asarray(rates, dtype=np.float64)
        self.l0_cdf = l0_cdf
        self.norm = {k: (float(m), max(float(s), 1e-12)) for k, (m, s) in norm.items()}
        self.thresholds = {k: float(v) for k, v in thresholds.items()}
        self.calibration = calibration
        # NLL = (c0 + a . w) / D with w_j = log((1 - r_j) / r_j): sparse-friendly, cost proportional to nnz.
        self._weights = np.log1p(-self.rates) - np.log(self.rates)
        self._base = float(-np.sum(np.log1p(-self.rates)))
        # l0 only takes the D + 1 values k / D, so the kernel CDF is tabulated once and scoring is a lookup.
        self._rate_table = self.l0_cdf.two_sided_score(np.arange(self.dim + 1) / self.dim)

    @property
    def threshold(self) -> float:
        """Threshold on the combined score: inputs scoring above it are flagged OOD."""
        return self.thresholds["combined"]

    @property
    def tpr(self) -> float | None:
        return None if self.calibration is None else float(self.calibration.get("tpr", 0.95))

    @classmethod
    def from_calibration(cls, cal: dict[str, Any]) -> OODScorer:
        """Rebuild a scorer from the JSON dict `calibrate` produced (validated by ood.schema)."""
        return cls.from_model(parse_calibration(cal), cal)

    @classmethod
    def from_model(cls, cal: Calibration, raw: dict[str, Any] | None = None) -> OODScorer:
        norm = cal.normalization
        return cls(
            dim=cal.dim,
            rates=np.asarray(cal.rates, dtype=np.float64),
            l0_cdf=SmoothedECDF(np.sort(np.asarray(cal.l0.knots, dtype=np.float64)), cal.l0.bandwidth),
            norm={"rate": (norm.rate.mean, norm.rate.std), "pattern": (norm.pattern.mean, norm.pattern.std)},
            thresholds=cal.thresholds.model_dump(include=set(SCORE_NAMES)),
            calibration=raw,
        )

    def score(self, embeddings: Any) -> OODScores:
        """Score a batch (CSR or dense, N x dim; a single 1-D vector is one input)."""
        active = activation_matrix(embeddings)
        if active.shape[1] != self.dim:
            raise ValueError(f"embeddings have {active.shape[1]} dimensions; the calibration has {self.dim}")
        counts = np.diff(active.indptr)
        l0, rate = counts / self.dim, self._rate_table[counts]
        pattern = (self._base + active @ self._weights) / self.dim
        (mr, sr), (mp, sp) = self.norm["rate"], self.norm["pattern"]
        combined = 0.5 * ((rate - mr) / sr + (pattern - mp) / sp)
        return OODScores(
            score=combined, l0=l0, is_ood=combined > self.threshold, rate_score=rate, pattern_score=pattern
        )
