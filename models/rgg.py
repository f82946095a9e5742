"""The Rectified LpJEPA target distribution: seeded torch sampling of GN_p / RGN_p plus its closed-form law.

The trainer draws a fresh B x D target sample every step (docs/METHOD.md §2), so sampling is done with torch on the
training device, in float32 or float64 regardless of the requested dtype (half precision would distort the
gamma draw and the tails), and cast at the end. The analytic side (pdf, cdf, moments, sigma choices, the l0
inverse) lives in `models.rgg_law`, which imports no torch; it is re-exported here so callers need one module.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models import rgg_law as law
from models.methods import TARGET_KINDS, TargetKind
from models.rgg_law import *  # noqa: F403

ShapeLike = int | Sequence[int]


def _as_shape(shape: ShapeLike) -> tuple[int, ...]:
    try:
        raw = (shape,) if not isinstance(shape, Sequence) else tuple(shape)
        if any(isinstance(d, bool) for d in raw):
            raise TypeError
        dims = tuple(operator.index(d) for d in raw)
    except TypeError:
        raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must be non-negative, got {shape!r}")
    return dims


def _placement(
    generator: torch.Generator | None, device: torch.device | str | None, dtype: torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """Where to draw and in which working precision; a generator on the wrong device is a clear error."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    if device is None:
        dev = generator.device if generator is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(f"generator lives on {generator.device} but sampling was asked on {dev}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return dev, work


def _draw_standard(
    shape: tuple[int, ...], p: float, generator: torch.Generator | None, device: torch.device, work: torch.dtype
) -> torch.Tensor:
    """T ~ GN_p(0, 1) as S * (p G)^(1/p), G ~ Gamma(1/p, 1), S = +-1, with the two cheap special cases."""
    if p == 2.0:  # S * sqrt(2 G) with G ~ Gamma(1/2) is exactly N(0, 1); randn is ~10x faster than gamma
        return torch.randn(shape, generator=generator, device=device, dtype=work)
    if p == 1.0:  # Gamma(1, 1) = Exp(1) = -log(1 - U); log1p(-U) never sees log(0) because U < 1
        mag = torch.rand(shape, generator=generator, device=device, dtype=work).neg_().log1p_().neg_()
    else:
        alpha = torch.full(shape, 1.0 / p, device=device, dtype=work)
        mag = torch._standard_gamma(alpha, generator=generator).mul_(p).pow_(1.0 / p)
    # Sign from a uniform shifted to [-0.5, 0.5): copysign is one fused kernel, no boolean mask.
    sign = torch.rand(shape, generator=generator, device=device, dtype=work).sub_(0.5)
    return mag.copysign_(sign)


def _finish(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    big = torch.finfo(dtype).max  # half precision: saturate rare far-tail draws instead of producing inf
    return x.clamp_(-big, big).to(dtype)


def sample_gn(
    shape: ShapeLike,
    p: float,
    mu: float = 0.0,
    sigma: float | str = 1.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draws X ~ GN_p(mu, sigma); sigma may also be 'gn' or 'rgn' (see `resolve_sigma`).

    Reproducible given `generator`; device defaults to the generator's device, else CPU.
    """
    p, mu = law.check_p(p), law.check_mu(mu)
    sigma = law.resolve_sigma(p, mu, sigma)
    dims = _as_shape(shape)
    dev, work = _placement(generator, device, dtype)
    x = _draw_standard(dims, p, generator, dev, work).mul_(sigma).add_(mu)
    return _finish(x, dtype)


def sample_rgn(shape: ShapeLike, p: float, mu: float = 0.0, sigma: float | str = 1.0, **placement: Any) -> torch.Tensor:
    """Draws x = ReLU(X), X ~ GN_p(mu, sigma): the RGN_p target of Rectified LpJEPA (`placement`: as sample_gn)."""
    return sample_gn(shape, p, mu, sigma, **placement).clamp_(min=0.0)


@dataclass(frozen=True)
class Target:
    """A training target: the law GN_p(mu, sigma) (sigma resolved to a number) and which of its forms the loss
    matched (`kind`: "rgn" = ReLU(X), "gn" = X, "gaussian" / "none" for methods whose loss has no GN law).

    Created once from the config, stored in the checkpoint's ModelConfig (target_p/mu/sigma/kind) and read back
    from it by evaluation and export, so nothing re-derives p, mu or sigma.
    """

    p: float
    mu: float
    sigma: float
    kind: TargetKind = "rgn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", law.check_p(self.p))
        object.__setattr__(self, "mu", law.check_mu(self.mu))
        object.__setattr__(self, "sigma", law.check_sigma(self.sigma))
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}")

    @classmethod
    def from_spec(cls, p: float, mu: float, sigma: str | float = "gn", kind: TargetKind = "rgn") -> Target:
        """Build from a config-style spec: sigma 'gn' (docs/METHOD.md default), 'rgn' or a number."""
        return cls(p, mu, law.resolve_sigma(p, mu, sigma), kind)

    def embedding_l0(self, rectified: bool) -> float | None:
        """The activation rate that the trained embedding should show, or None where the target says nothing
        about it: only an RGN target matched by rectified codes makes P(code > 0) = P(X > 0). A GN target has
        negative mass that ReLU codes cannot reach, raw codes (ablation_rgn_raw) are almost never exactly zero,
        and the dense and contrastive baselines have no such law at all."""
        return self.expected_l0 if rectified and self.kind == "rgn" else None

    @property
    def expected_l0(self) -> float:
        return law.expected_l0(self.p, self.mu, self.sigma)

    @property
    def expected_l1(self) -> float:
        return law.expected_l1(self.p, self.mu, self.sigma)

    @property
    def mean(self) -> float:
        return law.rgn_mean(self.p, self.mu, self.sigma)

    @property
    def var(self) -> float:
        return law.rgn_var(self.p, self.mu, self.sigma)

    def summary(self) -> dict[str, float]:
        """The `lpjepa target --json` fields: p, mu, sigma, expected_l0, expected_l1, mean, var."""
        return law.target_summary(self.p, self.mu, self.sigma)

    def sample(self, shape: ShapeLike, **placement: Any) -> torch.Tensor:
        """Rectified draw ReLU(X) (the RGN target); `placement` is sample_rgn's generator, device and dtype."""
        return sample_rgn(shape, self.p, self.mu, self.sigma, **placement)

    def sample_gn(self, shape: ShapeLike, **placement: Any) -> torch.Tensor:
        """Unrectified draw X (the GN target of the ablation in docs/METHOD.md §2)."""
        return sample_gn(shape, self.p, self.mu, self.sigma, **placement)
