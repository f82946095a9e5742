"""OOD scores that model more than one dimension at a time, each with a JSON-storable fitted state.

The activation scores of scores.py treat the dimensions of the firing pattern as independent; these model how
they fire together, or use the values and the encoder features:

pattern_mixture   -log p(a) / D under a K-component mixture of independent Bernoullis fitted by EM to the binary
                  firing patterns a (class-free clusters of codes, each with its own per-dimension rates).
pattern_lowrank   the Mahalanobis term of a probabilistic-PCA Gaussian (rank r + isotropic rest) on the binary
                  firing pattern: dependencies between dimensions at D x r cost, no D x D matrix.
code_lowrank      the same low-rank Gaussian on the code values.
code_mahalanobis  full Gaussian (Ledoit-Wolf) on the code values: the D x D baseline.
feature_mahalanobis  full Gaussian (Ledoit-Wolf) on the encoder features (the model's optional second output).

Every detector maps an `Inputs` batch to one score per row (higher = more unusual) and round-trips through
`state()` / `detector_from_state`; matrices travel as base64 float32 so a calibration stays a JSON object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import linalg, sparse
from scipy.special import logsumexp

from ood.schema import (
    DETECTOR_STATE,
    CalibrationError,
    GaussianState,
    LowRankState,
    MixtureState,
    encode_array,
    validate,
)
from ood.scores import activation_matrix, code_matrix

_EPS = 1e-6


@dataclass
class Inputs:
    """One batch as every detector may want it: the code (CSR), its firing pattern (CSR of ones), and the encoder
    features (dense, or None when the model does not export them)."""

    codes: sparse.csr_matrix
    active: sparse.csr_matrix
    features: NDArray[np.float32] | None = None

    @classmethod
    def from_arrays(cls, codes: Any, features: Any = None) -> Inputs:
        csr = code_matrix(codes)
        active = activation_matrix(csr)
        feats = None
        if features is not None:
            feats = np.asarray(features, dtype=np.float32)
            if feats.ndim == 1:
                feats = feats[None, :]
            if feats.ndim != 2 or feats.shape[0] != csr.shape[0]:
                raise ValueError(f"features must be ({csr.shape[0]}, F), got shape {feats.shape}")
            if not np.all(np.isfinite(feats)):
                raise ValueError("features contain NaN or infinite values")
        return cls(codes=csr, active=active, features=feats)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def take(self, rows: NDArray[Any]) -> Inputs:
        return Inputs(self.codes[rows], self.active[rows], None if self.features is None else self.features[rows])

    def get(self, name: str) -> Any:
        if name == "features":
            if self.features is None:
                raise ValueError("this score needs encoder features, which the model does not export")
            return self.features
        return {"active": self.active, "codes": self.codes}[name]


def _dense(x: Any) -> NDArray[np.float64]:
    return x.toarray().astype(np.float64) if sparse.issparse(x) else np.asarray(x, dtype=np.float64)


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


def _state(detector: Any, **fitted: Any) -> dict[str, Any]:
    """A detector's JSON state (ood.schema's DetectorState): its type and input, then the fitted values."""
    return {"type": detector.kind, "input": detector.input_name, **fitted}


class BernoulliMixture:
    """Mixture of K independent-Bernoulli components over the firing pattern, fitted by EM.

    log p(a | k) = sum_j [a_j log r_kj + (1 - a_j) log(1 - r_kj)] = b_k + a . w_k with w_kj = log(r_kj/(1-r_kj)),
    so scoring a sparse pattern costs nnz x K. Rates are Beta(alpha, alpha)-smoothed in the M-step (a MAP estimate)
    so no rate reaches 0 or 1 and a dimension a cluster never saw fire keeps a finite penalty.
    """

    kind = "bernoulli_mixture"

    def __init__(self, log_weights: NDArray[Any], rates: NDArray[Any], input_name: str = "active") -> None:
        self.log_weights = np.asarray(log_weights, dtype=np.float64)
        self.rates = np.clip(np.asarray(rates, dtype=np.float64), _EPS, 1 - _EPS)
        self.input_name = input_name
        self._w = (np.log(self.rates) - np.log1p(-self.rates)).T.copy()  # D x K
        self._b = np.sum(np.log1p(-self.rates), axis=1) + self.log_weights  # K

    @property
    def dim(self) -> int:
        return int(self.rates.shape[1])

    @classmethod
    def fit(
        cls, active: Any, k: int = 16, *, iters: int = 60, alpha: float = 1.0, seed: int = 0, tol: float = 1e-6
    ) -> BernoulliMixture:
        a = sparse.csr_matrix(active, dtype=np.float64)
        n, d = a.shape
        k = max(1, min(int(k), n))
        rng = np.random.default_rng(seed)
        base = (np.asarray(a.sum(axis=0)).ravel() + alpha) / (n + 2 * alpha)
        seeds = a[rng.choice(n, size=k, replace=False)].toarray()
        model = cls(np.full(k, -math.log(k)), 0.5 * seeds + 0.5 * base[None, :])
        last = -math.inf
        for _ in range(iters):
            log_joint = model._log_joint(a)
            norm = logsumexp(log_joint, axis=1)
            mean_ll = float(np.mean(norm))
            resp = np.exp(log_joint - norm[:, None])  # n x K
            nk = resp.sum(axis=0)
            rates = (np.asarray((a.T @ resp).T) + alpha) / (nk[:, None] + 2 * alpha)
            model = cls(np.log(np.maximum(nk, 1e-12) / n), rates)
            if mean_ll - last < tol * max(1.0, abs(mean_ll)):
                break
            last = mean_ll
        return model

    def _log_joint(self, active: Any) -> NDArray[np.float64]:
        return np.asarray(active @ self._w) + self._b[None, :]

    def log_likelihood(self, active: Any) -> NDArray[np.float64]:
        return logsumexp(self._log_joint(active), axis=1)

    def score(self, inputs: Inputs) -> NDArray[np.float64]:
        return -self.log_likelihood(inputs.get(self.input_name)) / self.dim

    def state(self) -> dict[str, Any]:
        return _state(self, log_weights=self.log_weights.tolist(), rates=encode_array(self.rates))

    @classmethod
    def from_state(cls, st: MixtureState) -> BernoulliMixture:
        return cls(np.asarray(st.log_weights, dtype=np.float64), st.rates.array, st.input)


class LowRankGaussian:
    """Probabilistic PCA (Tipping & Bishop 1999): C = U diag(lam) U^T + s2 (I - U U^T) with the top-r eigenpairs of
    the sample covariance and s2 the mean of the remaining eigenvalues (the maximum-likelihood noise variance).

    The score is the Mahalanobis term (x - m)^T C^-1 (x - m); the log-determinant is the same for every input and
    does not change a ranking. Scoring costs D x r per input.
    """

    kind = "lowrank_gaussian"

    def __init__(
        self, mean: NDArray[Any], components: NDArray[Any], eigvals: NDArray[Any], noise: float, input_name: str
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)  # r x D, orthonormal rows
        self.eigvals = np.asarray(eigvals, dtype=np.float64)
        self.noise = float(noise)
        self.input_name = input_name
        self._scale = 1.0 / self.eigvals - 1.0 / self.noise

    @classmethod
    def fit(cls, x: Any, rank: int = 32, *, input_name: str = "active") -> LowRankGaussian:
        n = x.shape[0]
        if n < 2:
            raise CalibrationError("a Gaussian needs at least 2 in-distribution inputs")
        if sparse.issparse(x):
            xs = sparse.csr_matrix(x, dtype=np.float64)
            mean = np.asarray(xs.mean(axis=0)).ravel()
            gram = np.asarray((xs.T @ xs).todense())
        else:
            xd = np.asarray(x, dtype=np.float64)
            mean = xd.mean(axis=0)
            gram = xd.T @ xd
        cov = (gram - n * np.outer(mean, mean)) / (n - 1)  # the (n - 1) convention of numpy.cov and sklearn's PCA
        vals, vecs = linalg.eigh(cov)
        vals, vecs = vals[::-1], vecs[:, ::-1]
        d = vals.size
        r = int(max(1, min(rank, d - 1)))
        floor = max(float(np.mean(np.maximum(vals, 0.0))), 1e-12) * 1e-6
        noise = max(float(np.mean(vals[r:])) if r < d else floor, floor)
        return cls(mean, vecs[:, :r].T, np.maximum(vals[:r], noise), noise, input_name)

    def mahalanobis(self, x: Any) -> NDArray[np.float64]:
        xc = _dense(x) - self.mean
        proj = xc @ self.components.T
        return np.sum(xc * xc, axis=1) / self.noise + np.sum(proj * proj * self._scale, axis=1)

    def score(self, inputs: Inputs) -> NDArray[np.float64]:
        return self.mahalanobis(inputs.get(self.input_name))

    def state(self) -> dict[str, Any]:
        mean, components = encode_array(self.mean), encode_array(self.components)
        return _state(self, mean=mean, components=components, eigvals=self.eigvals.tolist(), noise=self.noise)

    @classmethod
    def from_state(cls, st: LowRankState) -> LowRankGaussian:
        return cls(st.mean.array, st.components.array, np.asarray(st.eigvals, dtype=np.float64), st.noise, st.input)


class GaussianMahalanobis:
    """Single Gaussian with Ledoit-Wolf shrinkage, stored as mean + whitening matrix
    L^-1 (C = L L^T) so the score is ||L^-1 (x - m)||^2: one triangular mat-vec per input."""

    kind = "gaussian"

    def __init__(self, mean: NDArray[Any], whitening: NDArray[Any], shrinkage: float, input_name: str) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.whitening = np.asarray(whitening, dtype=np.float64)
        self.shrinkage = float(shrinkage)
        self.input_name = input_name

    @classmethod
    def fit(cls, x: Any, *, input_name: str) -> GaussianMahalanobis:
        xd = _dense(x)
        if xd.shape[0] < 2:
            raise CalibrationError("a Gaussian needs at least 2 in-distribution inputs")
        mean, cov, shrinkage = ledoit_wolf(xd)
        cov = cov + 1e-9 * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
        chol = linalg.cholesky(cov, lower=True)
        whitening = linalg.solve_triangular(chol, np.eye(cov.shape[0]), lower=True)
        return cls(mean, whitening, shrinkage, input_name)

    def score(self, inputs: Inputs) -> NDArray[np.float64]:
        xc = _dense(inputs.get(self.input_name)) - self.mean
        z = xc @ self.whitening.T
        return np.sum(z * z, axis=1)

    def state(self) -> dict[str, Any]:
        return _state(
            self, mean=encode_array(self.mean), whitening=encode_array(self.whitening), shrinkage=self.shrinkage
        )

    @classmethod
    def from_state(cls, st: GaussianState) -> GaussianMahalanobis:
        return cls(st.mean.array, st.whitening.array, st.shrinkage, st.input)


_KINDS = {c.kind: c for c in (BernoulliMixture, LowRankGaussian, GaussianMahalanobis)}


def detector_from_state(st: Any, where: str = "") -> Any:
    """Rebuild a detector from its `state()` or its validated schema model (ood.schema); CalibrationError names
    the field `where` when anything is off."""
    state = st if isinstance(st, MixtureState | LowRankState | GaussianState) else validate(DETECTOR_STATE, st, where)
    return _KINDS[state.type].from_state(state)


def fit_detectors(
    fit: Inputs, *, seed: int = 0, mixture_k: int = 16, rank: int = 32, alpha: float = 1.0
) -> dict[str, Any]:
    """Fit every multi-dimension detector the inputs allow (feature_mahalanobis only when features exist)."""
    out: dict[str, Any] = {
        "pattern_mixture": BernoulliMixture.fit(fit.active, mixture_k, alpha=alpha, seed=seed),
        "pattern_lowrank": LowRankGaussian.fit(fit.active, rank, input_name="active"),
        "code_lowrank": LowRankGaussian.fit(fit.codes, rank, input_name="codes"),
        "code_mahalanobis": GaussianMahalanobis.fit(fit.codes, input_name="codes"),
    }
    if fit.features is not None:
        out["feature_mahalanobis"] = GaussianMahalanobis.fit(fit.features, input_name="features")
    return out
