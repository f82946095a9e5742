"""The Rectified LpJEPA objective: w_inv * mean((z - z')^2) + w_rdm * (RDMReg(z) + RDMReg(z')) / 2.

Both views are gathered once, then every term runs on the global batch, so the value is identical on all ranks
and the DDP gradient equals the single-process gradient (see pretrain/distributed.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distributed import gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.rdmreg import RDMReg
from pretrain.losses.validation import check_embeddings, logged


class RectifiedLpJEPALoss(nn.Module):
    """Total loss and its logged parts for two views z, z' (B x D each, normally ReLU outputs).

    The ablation cells of the paper reuse this class: ``rectified_target=False`` targets plain GN, and whether
    the features are rectified is the projector's choice (the loss never applies a ReLU itself).
    """

    def __init__(
        self,
        w_inv: float = 25.0,
        w_rdm: float = 125.0,
        num_projections: int = 8192,
        p: float = 1.0,
        mu: float = 0.0,
        sigma: float = 1.0 / math.sqrt(2.0),
        rectified_target: bool = True,
        projection: str = "random",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if w_inv < 0 or w_rdm < 0:
            raise ValueError(f"RectifiedLpJEPALoss: weights must be non-negative, got w_inv={w_inv}, w_rdm={w_rdm}")
        self.w_inv, self.w_rdm = float(w_inv), float(w_rdm)
        self.rdm = RDMReg(num_projections, p, mu, sigma, rectified_target, projection, generator, seed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_embeddings("RectifiedLpJEPALoss", z1, z2)
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        with fp32_region(g1):
            g1, g2 = g1.float(), g2.float()
            inv = F.mse_loss(g1, g2)
            c1, c2 = self.rdm.view_directions([g1, g2])  # one random set per step, shared by the views
            rdm = 0.5 * (self.rdm(g1, gathered=True, directions=c1) + self.rdm(g2, gathered=True, directions=c2))
            total = self.w_inv * inv + self.w_rdm * rdm
        return total, logged(loss=total, invariance=inv, rdmreg=rdm)
