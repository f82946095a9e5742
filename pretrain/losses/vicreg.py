"""VICReg (Bardes et al.) and, fed ReLU outputs, the NVICReg-ReLU sparse baseline.

Normalisation follows the official implementation: invariance = MSE of the views; variance = hinge at 1 on
the per-dimension std (sqrt(var + eps), unbiased var), averaged over dimensions and over the two views;
covariance = sum of squared off-diagonal entries of each view's covariance divided by D, summed over the two
views. The variance and covariance terms are properties of the batch distribution, so they run on the
gathered batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distributed import gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.validation import check_embeddings, logged


def variance_hinge(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """mean_d relu(1 - sqrt(Var_batch(z_d) + eps)): keeps every dimension alive (no collapse)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariance entries / D: decorrelates dimensions."""
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.square().sum() / d


class VICRegLoss(nn.Module):
    """w_inv * invariance + w_var * variance + w_cov * covariance, with the parts for logging."""

    def __init__(self, w_inv: float = 25.0, w_var: float = 25.0, w_cov: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        if min(w_inv, w_var, w_cov) < 0:
            raise ValueError("VICRegLoss: weights must be non-negative")
        if not eps > 0:
            raise ValueError(f"VICRegLoss: eps must be positive, got {eps}")
        self.w_inv, self.w_var, self.w_cov, self.eps = float(w_inv), float(w_var), float(w_cov), float(eps)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_embeddings("VICRegLoss", z1, z2)
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        with fp32_region(g1):
            g1, g2 = g1.float(), g2.float()
            inv = F.mse_loss(g1, g2)
            var = 0.5 * (variance_hinge(g1, self.eps) + variance_hinge(g2, self.eps))
            cov = covariance_penalty(g1) + covariance_penalty(g2)
            total = self.w_inv * inv + self.w_var * var + self.w_cov * cov
        return total, logged(loss=total, invariance=inv, variance=var, covariance=cov)
