"""Sparsity of embeddings, as the paper reports it (docs/METHOD.md section 3), plus dead dimensions.

- l0: fraction of non-zero entries over all N x D entries (the activation rate). Only a rectified output
  produces exact zeros; a dense method reports l0 = 1, which is the honest answer, not a bug.
- l1 metric: mean over samples of (1/D) (||z||_1 / ||z||_2)^2. By Cauchy-Schwarz it lies in [1/D, 1]: 1/D for a
  one-hot row, 1 for a constant-magnitude row, 2/pi for a Gaussian row (E|x|^2 / E x^2). An all-zero row has
  no direction at all; it counts as 0 (the limit of ever sparser rows) and `zero_rows` reports how many.
- dead dims: dimensions that are zero on every sample of the split. They carry no information, inflate the
  apparent sparsity, and have no kernel bandwidth, so nHSIC leaves them out.
"""

from __future__ import annotations

import torch


def _check(z: torch.Tensor) -> torch.Tensor:
    if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D (samples x dims) tensor, got {tuple(z.shape)}")
    return z


def l0_fraction(z: torch.Tensor) -> float:
    """Non-zero entries over all entries."""
    z = _check(z)
    return float((z != 0).sum(dtype=torch.float64) / z.numel())


def l1_metric_rows(z: torch.Tensor) -> torch.Tensor:
    """Per-sample (1/D) (||z||_1 / ||z||_2)^2 in float64; all-zero rows give 0."""
    z = _check(z).double()
    l1 = z.abs().sum(1)
    l2sq = z.square().sum(1)
    ratio = torch.where(
        l2sq > 0, l1.square() / torch.where(l2sq > 0, l2sq, torch.ones_like(l2sq)), torch.zeros_like(l2sq)
    )
    return ratio / z.shape[1]


def l1_metric(z: torch.Tensor) -> float:
    return float(l1_metric_rows(z).mean())


def dead_mask(z: torch.Tensor) -> torch.Tensor:
    """True for dimensions that are zero on every sample."""
    return (_check(z) == 0).all(0)


def dead_fraction(z: torch.Tensor) -> float:
    return float(dead_mask(z).double().mean())


def sparsity_report(z: torch.Tensor) -> dict[str, float | int]:
    mask = dead_mask(z)
    return {
        "l0": l0_fraction(z),
        "l1": l1_metric(z),
        "dead_dims": float(mask.double().mean()),
        "dead_dims_count": int(mask.sum()),
        "zero_rows": int((z == 0).all(1).sum()),
    }


# A dimension firing at less than this fraction of the target rate is "near dead" (issue 15's definition).
NEAR_DEAD_FRACTION = 0.1
RATE_PERCENTILES = (5, 25, 50, 75, 95)


def dimension_rates(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension activation rate: the fraction of samples on which each dimension is non-zero (float64)."""
    return (_check(z) != 0).double().mean(0)


def rate_report(z: torch.Tensor, target_l0: float | None) -> dict[str, object]:
    """Per-dimension rate percentiles, and against the designed rate: the relative l0 error
    (l0 - target) / target and the near-dead dimensions (rate < NEAR_DEAD_FRACTION x target).

    The mean l0 alone can look right while most dimensions are dead and the survivors fire too often; the
    percentiles and the near-dead count show the shape of the per-dimension rates behind it.
    """
    rates = dimension_rates(z)
    q = torch.quantile(rates, torch.tensor([p / 100 for p in RATE_PERCENTILES], dtype=torch.float64))
    out: dict[str, object] = {f"rate_p{p:02d}": float(v) for p, v in zip(RATE_PERCENTILES, q, strict=True)}
    if target_l0:
        l0 = float(rates.mean())
        near = int((rates < NEAR_DEAD_FRACTION * target_l0).sum())
        out.update(l0_rel_err=(l0 - target_l0) / target_l0, near_dead_dims=near, near_dead_frac=near / rates.numel())
    else:
        out.update(l0_rel_err=None, near_dead_dims=None, near_dead_frac=None)
    return out
