"""LeJEPA baseline: (1 - lambda) * prediction-to-center loss + lambda * SIGReg.

The invariance term follows LeJEPA's public code: the element-wise mean of (center - z_v)^2 over views,
samples and dimensions (not a per-sample squared norm), where center is the per-sample mean of the views.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.distributed import gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.sigreg import SIGReg
from pretrain.losses.validation import check_embeddings, logged


class LeJEPALoss(nn.Module):
    """Total loss and logged parts for two or more views (each B x D)."""

    def __init__(
        self,
        lam: float = 0.05,
        num_projections: int = 1024,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"LeJEPALoss: lambda must lie in [0, 1], got {lam}")
        self.lam = float(lam)
        self.sigreg = SIGReg(num_projections, generator, seed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        views = (z1, z2, *more)
        check_embeddings("LeJEPALoss", *views)
        z = gather_with_grad(torch.stack(views), dim=1)  # V x N_global x D
        with fp32_region(z):
            z = z.float()
            center = z.mean(dim=0, keepdim=True)
            inv = (center - z).square().mean()
            sig = self.sigreg(z, gathered=True)
            total = (1.0 - self.lam) * inv + self.lam * sig
        return total, logged(loss=total, invariance=inv, sigreg=sig)
