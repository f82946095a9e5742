"""The view-invariance term of Rectified LpJEPA and VICReg: mean squared difference of paired embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """mean((z1 - z2)^2) over batch and dimensions, in fp32.

    Per-sample, so it needs no gather: averaged over ranks by DDP it already equals the global-batch mean
    (given equal local batch sizes). The composite losses nevertheless evaluate it on the gathered batch so
    that every rank logs the same number.
    """
    return F.mse_loss(z1.float(), z2.float())
