"""Normalized HSIC between embedding dimensions: dependence that a covariance penalty cannot see.

VICReg-style regularisers decorrelate dimensions; the RGG target asks for independent ones. HSIC with a
characteristic (Gaussian) kernel is zero iff two variables are independent, so it also sees y = x^2, which has
zero correlation with a symmetric x. The paper's claim is that RGG runs have far lower nHSIC than VICReg.

Definition used here (lower is more independent, range [0, 1]):

    nHSIC(Z) = mean over the m (m - 1) / 2 pairs (i, j), i < j, of m live dimensions of
               HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) * HSIC(K_j, K_j))

computed on a seeded subsample of n rows of Z (default n = 512), where for dimension i

    K_i[a, b]   = exp(-(z_ai - z_bi)^2 / (2 h_i^2)),
    h_i         = median of the non-zero |z_ai - z_bi| over a < b   (median heuristic),
    HSIC(K, L)  = tr(K H L H) / (n - 1)^2,  H = I - 11^T / n        (the biased V-statistic).

Since H is idempotent, the ratio equals <HK_iH, HK_jH>_F / (||HK_iH||_F ||HK_jH||_F): the cosine between centred
Gram matrices (kernel alignment / CKA between single dimensions), so all pairs come from one matrix product of
the m flattened, normalised centred Grams. The median is over non-zero distances because a sparse rectified
dimension is zero on most rows, which would make the plain median 0. Live dimensions are those that fire
somewhere on the split (dead ones are reported by `dead_dims` instead) and are not constant on the subsample
(a constant has a zero centred Gram, so the ratio is undefined). The m dimensions are all live ones when there
are at most `max_dims` (default 16, i.e. 120 pairs), else `max_dims` drawn uniformly with the seed.
The biased estimator is positive even for independent dimensions, by about 1/n, so compare runs at equal n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SAMPLES = 512
DEFAULT_DIMS = 16


def median_bandwidth(x: torch.Tensor) -> float:
    """Median of the non-zero pairwise distances |x_a - x_b|; 0.0 when x is constant."""
    d = torch.pdist(x.double().reshape(-1, 1).cpu()).numpy()
    d = d[d > 0]
    return float(np.median(d)) if d.size else 0.0  # numpy's median: the mean of the two middle values


def centred_gram(x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """H K H for the Gaussian kernel on a 1-D sample (float64); zeros when x is constant."""
    x = x.double().reshape(-1)
    h = median_bandwidth(x) if bandwidth is None else float(bandwidth)
    if h <= 0:
        return torch.zeros(x.numel(), x.numel(), dtype=torch.float64, device=x.device)
    k = torch.exp(-(x[:, None] - x[None, :]).square() / (2.0 * h * h))
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def nhsic_pair(x: torch.Tensor, y: torch.Tensor) -> float:
    """Normalized HSIC of two 1-D samples (module docstring); NaN when either is constant."""
    kx, ky = centred_gram(x), centred_gram(y)
    denom = float(torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky))
    return float((kx * ky).sum()) / denom if denom > 0 else float("nan")


def nhsic_matrix(z: torch.Tensor) -> torch.Tensor:
    """m x m matrix of nHSIC between all columns of z (n x m), all non-constant; diagonal is 1."""
    grams = torch.stack([centred_gram(z[:, i]).flatten() for i in range(z.shape[1])])
    grams = grams / torch.linalg.vector_norm(grams, dim=1, keepdim=True)
    return grams @ grams.T


@dataclass
class NhsicResult:
    value: float | None  # None when fewer than two live dimensions remain
    pairs: int
    live_dims: int  # live on the subsample, before choosing max_dims of them
    samples: int


def nhsic(
    z: torch.Tensor, *, n_samples: int = DEFAULT_SAMPLES, max_dims: int = DEFAULT_DIMS, seed: int = 0
) -> NhsicResult:
    """nHSIC of an embedding matrix (samples x dims), as defined in the module docstring."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"nHSIC needs a 2-D embedding matrix with at least 2 rows, got {tuple(z.shape)}")
    if n_samples < 2 or max_dims < 2:
        raise ValueError("nHSIC needs n_samples >= 2 and max_dims >= 2")
    rng = np.random.default_rng(seed)
    live = (z != 0).any(0)
    rows = np.sort(rng.choice(z.shape[0], size=min(n_samples, z.shape[0]), replace=False))
    sub = z[torch.from_numpy(rows)][:, live].double()
    varying = torch.nonzero(sub.amax(0) > sub.amin(0)).flatten().numpy()
    if len(varying) < 2:
        return NhsicResult(value=None, pairs=0, live_dims=len(varying), samples=len(rows))
    chosen = np.sort(rng.choice(varying, size=min(max_dims, len(varying)), replace=False))
    mat = nhsic_matrix(sub[:, torch.from_numpy(chosen)])
    iu = torch.triu_indices(len(chosen), len(chosen), offset=1)
    pair_values = mat[iu[0], iu[1]]
    return NhsicResult(
        value=float(pair_values.mean()), pairs=int(pair_values.numel()), live_dims=len(varying), samples=len(rows)
    )
