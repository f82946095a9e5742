"""SIGReg (LeJEPA): Epps-Pulley goodness-of-fit of random 1-D projections against N(0, 1).

The statistic compares the empirical characteristic function with exp(-t^2/2), weighted by the same Gaussian
window, so it is smooth, bounded per sample (cos/sin) and cheap: no sorting, no density estimate.
Normalisation follows LeJEPA's public code: knots t_j = linspace(0, t_max, n), trapezoid weights on
[0, t_max] DOUBLED (the integrand is even in t, so this is the integral over [-t_max, t_max]) times
exp(-t_j^2/2); statistic = N * sum.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.distributed import gather_with_grad
from pretrain.losses.precision import fp32_region
from pretrain.losses.randomness import SharedGenerator, random_unit_directions


def epps_pulley_quadrature(num_knots: int = 17, t_max: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots t, quadrature weights (trapezoid x 2 x window) and the target CF phi(t) = exp(-t^2/2), fp32."""
    if int(num_knots) < 2:
        raise ValueError(f"Epps-Pulley: num_knots must be >= 2, got {num_knots}")
    if not t_max > 0:
        raise ValueError(f"Epps-Pulley: t_max must be positive, got {t_max}")
    t = torch.linspace(0.0, float(t_max), int(num_knots), dtype=torch.float32)
    dt = float(t_max) / (int(num_knots) - 1)
    w = torch.full((int(num_knots),), 2.0 * dt, dtype=torch.float32)
    w[0] = w[-1] = dt
    phi = torch.exp(-0.5 * t.square())
    return t, w * phi, phi


def epps_pulley(x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Epps-Pulley statistic of each column of ``x`` (..., N, K) against N(0, 1); returns (..., K).

    err(t) = (mean cos(t x) - phi(t))^2 + (mean sin(t x))^2, statistic = N * sum_j weights_j * err(t_j).
    """
    n = x.shape[-2]
    xt = x.unsqueeze(-1) * t  # (..., N, K, T)
    err = (torch.cos(xt).mean(dim=-3) - phi).square() + torch.sin(xt).mean(dim=-3).square()
    return n * (err @ weights)


class SIGReg(nn.Module):
    """Sliced Epps-Pulley statistic averaged over ``num_projections`` fresh unit directions (and over views).

    Accepts one view (N x D) or stacked views (V x N x D); all views share the step's directions. The batch
    dimension is gathered across ranks first, so N is the global batch size.
    """

    def __init__(
        self,
        num_projections: int = 1024,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if int(num_projections) < 1:
            raise ValueError(f"SIGReg: num_projections must be >= 1, got {num_projections}")
        self.num_projections = int(num_projections)
        t, w, phi = epps_pulley_quadrature()
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("weights", w, persistent=False)
        self.register_buffer("phi", phi, persistent=False)
        self._rng = SharedGenerator(generator, seed)

    def forward(self, z: torch.Tensor, *, gathered: bool = False) -> torch.Tensor:
        if z.dim() not in (2, 3):
            raise ValueError(f"SIGReg: expected N x D or V x N x D embeddings, got shape {tuple(z.shape)}")
        if z.shape[-2] < 2:
            raise ValueError(f"SIGReg: needs a batch of at least 2, got {z.shape[-2]}")
        zg = z if gathered else gather_with_grad(z, dim=z.dim() - 2)
        with fp32_region(zg):
            zg = zg.float()
            gen = self._rng.get(zg.device)
            a = random_unit_directions(self.num_projections, zg.shape[-1], gen, zg.device)
            t, w, phi = (b.to(zg.device) for b in (self.t, self.weights, self.phi))
            return epps_pulley(zg @ a.T, t, w, phi).mean()
