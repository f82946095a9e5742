"""NT-Xent (SimCLR) and, fed ReLU outputs, the NCL-ReLU sparse baseline.

Every rank builds the full 2N x 2N cosine-similarity matrix of the GLOBAL batch (as solo-learn does), so all
samples of all ranks act as negatives and the loss value is the same on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distributed import gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.validation import check_embeddings, logged


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the 2N anchors of -log softmax similarity of the positive among the 2N - 1 others."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = torch.cat([idx + n, idx])
    return F.cross_entropy(sim, targets)


class NTXentLoss(nn.Module):
    """SimCLR's contrastive loss with temperature (0.2 by default, solo-learn's CIFAR value)."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"NTXentLoss: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_embeddings("NTXentLoss", z1, z2)
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        with fp32_region(g1):
            total = nt_xent(g1.float(), g2.float(), self.temperature)
        return total, logged(loss=total, ntxent=total)
