"""The target distribution against independent references: scipy.stats.gennorm, quadrature, Monte Carlo."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special
from scipy.stats import gennorm

from models import rgg
from models.rgg import Target

P_VALUES = (0.5, 1.0, 1.5, 2.0, 3.0)
MU_VALUES = (-3.0, -1.0, 0.0, 0.5, 2.0)
N_MC = 1 << 20  # >= 10^6 draws per p
Z = 5.0  # Monte Carlo tolerance in standard errors


def scipy_law(p: float, mu: float, sigma: float):
    """The method's GN_p(mu, sigma) in scipy's parametrization (docs/METHOD.md §1)."""
    return gennorm(beta=p, loc=mu, scale=sigma * p ** (1.0 / p))


def method_pdf(x: np.ndarray, p: float, mu: float, sigma: float) -> np.ndarray:
    """The density exactly as docs/METHOD.md writes it, as a second reference next to gennorm."""
    norm = p ** (1.0 - 1.0 / p) / (2.0 * sigma * special.gamma(1.0 / p))
    return norm * np.exp(-(np.abs(x - mu) ** p) / (p * sigma**p))


def quad_moment(q: float, p: float, mu: float, sigma: float) -> float:
    """E[ReLU(X)^q] = int_0^inf x^q f(x) dx with docs/METHOD.md's density (checked against gennorm above), split at
    the mode. Scalar math instead of gennorm.pdf keeps each integral ~10x cheaper."""
    norm = p ** (1.0 - 1.0 / p) / (2.0 * sigma * math.gamma(1.0 / p))
    denom = p * sigma**p

    def f(x: float) -> float:
        return x**q * norm * math.exp(-(abs(x - mu) ** p) / denom)

    opts = {"epsabs": 0.0, "epsrel": 1e-11, "limit": 400}
    a = max(mu, 0.0)
    lower = integrate.quad(f, 0.0, a, **opts)[0] if a > 0 else 0.0
    return lower + integrate.quad(f, a, math.inf, **opts)[0]


_STANDARD: dict[float, np.ndarray] = {}


def standard_draws(p: float) -> np.ndarray:
    """One seeded GN_p(0, 1) sample per p from the library's sampler, reused across mu (x = mu + sigma T)."""
    if p not in _STANDARD:
        gen = torch.Generator().manual_seed(1234 + int(10 * p))
        _STANDARD[p] = rgg.sample_gn(N_MC, p, generator=gen, dtype=torch.float64).numpy()
    return _STANDARD[p]


def rectified(p: float, mu: float, sigma: float) -> np.ndarray:
    return np.maximum(mu + sigma * standard_draws(p), 0.0)


# --------------------------------------------------------------------------------------------- GN_p itself
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("mu", MU_VALUES)
def test_pdf_cdf_ppf_match_gennorm(p: float, mu: float) -> None:
    sigma = 0.8
    law = scipy_law(p, mu, sigma)
    x = np.linspace(mu - 12.0, mu + 12.0, 401)
    np.testing.assert_allclose(rgg.gn_pdf(x, p, mu, sigma), law.pdf(x), rtol=1e-12, atol=0)
    np.testing.assert_allclose(rgg.gn_pdf(x, p, mu, sigma), method_pdf(x, p, mu, sigma), rtol=1e-12, atol=0)
    np.testing.assert_allclose(rgg.gn_cdf(x, p, mu, sigma), law.cdf(x), rtol=1e-11, atol=1e-300)
    np.testing.assert_allclose(rgg.gn_sf(x, p, mu, sigma), law.sf(x), rtol=1e-11, atol=1e-300)
    levels = np.array([1e-12, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-6])
    np.testing.assert_allclose(rgg.gn_ppf(levels, p, mu, sigma), law.ppf(levels), rtol=1e-10, atol=1e-12)
    assert integrate.quad(lambda t: rgg.gn_pdf(t, p, mu, sigma), -math.inf, math.inf)[0] == pytest.approx(1.0)


def test_scalar_in_scalar_out() -> None:
    assert np.ndim(rgg.gn_pdf(0.3, 1.0)) == 0 and np.ndim(rgg.gn_cdf(0.3, 1.0)) == 0
    assert rgg.gn_cdf(np.zeros((2, 3)), 2.0).shape == (2, 3)


@pytest.mark.parametrize("p", P_VALUES)
def test_sampler_matches_law_ks(p: float) -> None:
    """Kolmogorov-Smirnov of the float32 sampler (incl. the p=1 and p=2 fast paths) against gennorm."""
    from scipy.stats import kstest

    gen = torch.Generator().manual_seed(7)
    x = rgg.sample_gn(200_000, p, 0.4, 1.3, generator=gen).double().numpy()
    assert kstest(x, scipy_law(p, 0.4, 1.3).cdf).pvalue > 1e-3


# -------------------------------------------------------------------------------------- the rectified law
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("mu", MU_VALUES)
def test_activation_rate_analytic_scipy_mc(p: float, mu: float) -> None:
    sigma = rgg.sigma_gn(p)
    rate = rgg.expected_l0(p, mu, sigma)
    assert rate == pytest.approx(scipy_law(p, mu, sigma).sf(0.0), rel=1e-11)
    # It is Phi_{GN_p(0,1)}(mu / sigma) as docs/METHOD.md states.
    assert rate == pytest.approx(scipy_law(p, 0.0, 1.0).cdf(mu / sigma), rel=1e-11)
    active = rectified(p, mu, sigma) > 0
    se = math.sqrt(rate * (1 - rate) / N_MC)
    assert abs(active.mean() - rate) < Z * se


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("mu", MU_VALUES)
def test_moments_against_quadrature(p: float, mu: float) -> None:
    sigma = rgg.sigma_gn(p)
    for q in (1, 2, 3, 0.5, 1.7):
        assert rgg.rgn_moment(q, p, mu, sigma) == pytest.approx(quad_moment(q, p, mu, sigma), rel=1e-8)
    m1, m2 = quad_moment(1, p, mu, sigma), quad_moment(2, p, mu, sigma)
    assert rgg.rgn_mean(p, mu, sigma) == pytest.approx(m1, rel=1e-8)
    assert rgg.rgn_var(p, mu, sigma) == pytest.approx(m2 - m1 * m1, rel=1e-8)
    assert rgg.expected_l1(p, mu, sigma) == pytest.approx(m1 * m1 / m2, rel=1e-8)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("mu", MU_VALUES)
def test_moments_against_monte_carlo(p: float, mu: float) -> None:
    sigma = rgg.sigma_gn(p)
    x = rectified(p, mu, sigma)
    n = x.size
    mean, m2 = x.mean(), (x * x).mean()
    assert abs(mean - rgg.rgn_mean(p, mu, sigma)) < Z * x.std() / math.sqrt(n)
    var_hat = x.var()
    fourth = ((x - mean) ** 4).mean()
    assert abs(var_hat - rgg.rgn_var(p, mu, sigma)) < Z * math.sqrt((fourth - var_hat**2) / n)
    # l1 = a^2 / b with a = E x, b = E x^2: delta-method standard error from the covariance of (x, x^2).
    grad = np.array([2 * mean / m2, -(mean**2) / m2**2])
    cov = np.cov(np.stack([x, x * x]))
    se_l1 = math.sqrt(grad @ cov @ grad / n)
    assert abs(mean**2 / m2 - rgg.expected_l1(p, mu, sigma)) < Z * se_l1
    for q in (0.5, 3.0):
        xq = x**q
        assert abs(xq.mean() - rgg.rgn_moment(q, p, mu, sigma)) < Z * xq.std() / math.sqrt(n)


def test_laplace_closed_form_and_published_point() -> None:
    """p = 1, mu < 0: the active part is Exp(scale s) (memoryless), so mean = l0 s and E x^2 = 2 l0 s^2."""
    sigma = 1 / math.sqrt(2)
    rate = rgg.expected_l0(1.0, -3.0, sigma)
    assert rate == pytest.approx(0.5 * math.exp(-3.0 / sigma), rel=1e-14)
    assert 0.006 < rate < 0.008  # "about 0.7% active" (docs/METHOD.md §1)
    assert rgg.rgn_mean(1.0, -3.0, sigma) == pytest.approx(rate * sigma, rel=1e-12)
    assert rgg.rgn_second_moment(1.0, -3.0, sigma) == pytest.approx(2 * rate * sigma**2, rel=1e-12)
    assert rgg.expected_l1(1.0, -3.0, sigma) == pytest.approx(rate / 2, rel=1e-12)
    # p = 2, mu = 0: half-normal moments; l1 = 1/pi.
    assert rgg.expected_l1(2.0, 0.0, 1.0) == pytest.approx(1 / math.pi, rel=1e-14)
    assert rgg.rgn_var(2.0, 0.0, 1.0) == pytest.approx(0.5 - 1 / (2 * math.pi), rel=1e-14)


@pytest.mark.parametrize(
    ("p", "mu", "sigma"),
    [(0.05, 1.0, None), (0.05, -0.01, None), (20.0, -0.5, 1.0), (1000.0, 0.3, 1.0), (8.0, -1.5, 1.0)],
)
def test_extreme_shapes_against_mpmath(p: float, mu: float, sigma: float | None) -> None:
    """Far from p in [0.5, 3] (scipy's gennorm.sf already breaks at p = 1000) vs 40-digit mpmath."""
    mp = pytest.importorskip("mpmath")
    sigma = rgg.sigma_gn(p) if sigma is None else sigma
    with mp.workdps(40):
        pp, mm = mp.mpf(p), mp.mpf(mu)
        s = mp.mpf(sigma) * pp ** (1 / pp)
        dens = pp / (2 * s * mp.gamma(1 / pp))

        def moment(q: int) -> float:
            f = lambda x: x**q * dens * mp.exp(-((abs(x - mm) / s) ** pp))  # noqa: E731
            edges = [0, mm] if mu > 0 else [0]
            edges += [max(mu, 0) + k * s for k in (1, 4, 16, 64, 256)] + [mp.inf]
            return float(mp.quad(f, edges))

        m0, m1, m2 = moment(0), moment(1), moment(2)
    assert rgg.expected_l0(p, mu, sigma) == pytest.approx(m0, rel=1e-9)
    assert rgg.rgn_mean(p, mu, sigma) == pytest.approx(m1, rel=1e-9)
    assert rgg.rgn_var(p, mu, sigma) == pytest.approx(m2 - m1 * m1, rel=1e-8)


# ---------------------------------------------------------------------------------------- choosing sigma
@pytest.mark.parametrize("p", P_VALUES + (0.25, 6.0))
def test_sigma_gn_gives_unit_variance(p: float) -> None:
    sigma = rgg.sigma_gn(p)
    assert scipy_law(p, 0.0, sigma).var() == pytest.approx(1.0, rel=1e-12)
    assert rgg.gn_var(p, sigma) == pytest.approx(1.0, rel=1e-12)


def test_sigma_gn_published_values() -> None:
    assert rgg.sigma_gn(2.0) == pytest.approx(1.0, rel=1e-15)
    assert rgg.sigma_gn(1.0) == pytest.approx(1 / math.sqrt(2), rel=1e-15)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("mu", (-3.0, 0.0, 2.0))
def test_sigma_rgn_gives_unit_variance_after_relu(p: float, mu: float) -> None:
    sigma = rgg.sigma_rgn(p, mu)
    assert sigma >= rgg.sigma_gn(p)  # ReLU is 1-Lipschitz: rectifying can only lose variance
    m1, m2 = quad_moment(1, p, mu, sigma), quad_moment(2, p, mu, sigma)
    assert m2 - m1 * m1 == pytest.approx(1.0, rel=1e-9)
    assert rgg.resolve_sigma(p, mu, "rgn") == sigma
    gen = torch.Generator().manual_seed(11)
    x = rgg.sample_rgn(N_MC, p, mu, "rgn", generator=gen, dtype=torch.float64).numpy()
    fourth = ((x - x.mean()) ** 4).mean()
    assert abs(x.var() - 1.0) < Z * math.sqrt((fourth - x.var() ** 2) / x.size)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("rate", (1e-4, 0.05, 0.5, 0.9))
def test_mu_for_l0_round_trips(p: float, rate: float) -> None:
    mu, sigma = rgg.mu_for_l0(p, rate)  # sigma_GN: closed form through the quantile
    assert sigma == rgg.sigma_gn(p)
    assert rgg.expected_l0(p, mu, sigma) == pytest.approx(rate, rel=1e-10)
    assert scipy_law(p, mu, sigma).sf(0.0) == pytest.approx(rate, rel=1e-9)

    mu, sigma = rgg.mu_for_l0(p, rate, 0.4)
    assert sigma == 0.4
    assert mu == pytest.approx(0.4 * scipy_law(p, 0.0, 1.0).ppf(rate), rel=1e-10, abs=1e-14)

    mu, sigma = rgg.mu_for_l0(p, rate, "rgn")  # coupled: must agree with brentq's sigma_RGN at that mu
    assert rgg.expected_l0(p, mu, sigma) == pytest.approx(rate, rel=1e-10)
    assert rgg.sigma_rgn(p, mu) == pytest.approx(sigma, rel=1e-9)
    assert rgg.rgn_var(p, mu, sigma) == pytest.approx(1.0, rel=1e-10)


# --------------------------------------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    p=st.floats(0.3, 6.0),
    mu=st.floats(-4.0, 4.0),
    sigma=st.floats(0.2, 3.0),
)
def test_property_rate_and_moments(p: float, mu: float, sigma: float) -> None:
    rate = rgg.expected_l0(p, mu, sigma)
    assert 0.0 <= rate <= 1.0
    assert rate + rgg.expected_l0(p, -mu, sigma) == pytest.approx(1.0, abs=1e-12)
    assert rgg.expected_l0(p, mu + 0.1, sigma) >= rate
    if abs(mu) / (sigma * p ** (1 / p)) < 3:  # away from the far tails the rate is strictly inside (0, 1)
        assert 0.0 < rate < 1.0
    m1, m2 = quad_moment(1, p, mu, sigma), quad_moment(2, p, mu, sigma)
    assert rgg.rgn_mean(p, mu, sigma) == pytest.approx(m1, rel=1e-7, abs=1e-300)
    assert rgg.rgn_second_moment(p, mu, sigma) == pytest.approx(m2, rel=1e-7, abs=1e-300)
    assert rgg.rgn_var(p, mu, sigma) == pytest.approx(m2 - m1 * m1, rel=1e-6, abs=1e-12 * m2)
    assert 0.0 <= rgg.expected_l1(p, mu, sigma) <= 1.0
    assert rgg.rgn_mean(p, mu + 0.1, sigma) >= rgg.rgn_mean(p, mu, sigma)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(p=st.floats(0.3, 8.0), rate=st.floats(1e-6, 1 - 1e-6))
def test_property_inverse(p: float, rate: float) -> None:
    mu, sigma = rgg.mu_for_l0(p, rate)
    assert rgg.expected_l0(p, mu, sigma) == pytest.approx(rate, rel=1e-9)
    mu, sigma = rgg.mu_for_l0(p, rate, "rgn")
    assert rgg.expected_l0(p, mu, sigma) == pytest.approx(rate, rel=1e-9)
    assert rgg.rgn_var(p, mu, sigma) == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("p", (0.5, 1.0, 2.0, 3.0))
def test_seeded_sampling_is_reproducible(p: float) -> None:
    def draw(seed: int) -> torch.Tensor:
        return rgg.sample_rgn((64, 32), p, -0.5, "gn", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    torch.manual_seed(5)
    a = rgg.sample_gn(100, p)
    torch.manual_seed(5)
    assert torch.equal(a, rgg.sample_gn(100, p))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
@pytest.mark.parametrize("p", (0.5, 1.0, 2.0, 3.0))
def test_dtype_respected_and_drawn_in_float32(dtype: torch.dtype, p: float) -> None:
    target = Target.from_spec(p, 0.0)
    x = target.sample((200, 256), generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert x.dtype == dtype and x.shape == (200, 256) and x.device.type == "cpu"
    assert torch.isfinite(x).all() and (x >= 0).all()
    # Half precision is the float32 draw cast at the end, never a half-precision gamma draw.
    if dtype in (torch.float16, torch.bfloat16):
        ref = target.sample((200, 256), generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        assert torch.equal(x, ref.to(dtype))
    mean = x.double().mean().item()
    se = math.sqrt(target.var / x.numel())
    assert abs(mean - target.mean) < Z * se + 0.01 * target.mean  # 1% covers half-precision rounding


def test_device_follows_generator_and_mismatch_is_an_error() -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    assert rgg.sample_gn(4, 1.5, generator=gen).device.type == "cpu"
    assert rgg.sample_gn(4, 1.5, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="generator lives on cpu"):
        rgg.sample_gn(4, 1.5, generator=gen, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", (0.5, 1.0, 2.0, 3.0))
def test_cuda_sampling(p: float) -> None:
    def draw() -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(9)
        return rgg.sample_rgn((512, 2048), p, -1.0, "gn", generator=gen, dtype=torch.bfloat16)

    x = draw()
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16
    assert torch.equal(x, draw())
    rate = rgg.expected_l0(p, -1.0, rgg.sigma_gn(p))
    assert abs((x > 0).float().mean().item() - rate) < Z * math.sqrt(rate * (1 - rate) / x.numel())


# ------------------------------------------------------------------------------------- validation and API
@pytest.mark.parametrize("p", (0, -1.0, math.nan, math.inf, True, "1"))
def test_bad_p_is_a_value_error(p: object) -> None:
    with pytest.raises(ValueError, match="p must"):
        rgg.sigma_gn(p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must"):
        rgg.sample_rgn(3, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p must"):
        Target(p, 0.0, 1.0)  # type: ignore[arg-type]


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="sigma must be > 0"):
        rgg.expected_l0(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        rgg.sample_gn(3, 1.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="'gn', 'rgn' or a"):
        rgg.resolve_sigma(1.0, 0.0, "gaussian")
    with pytest.raises(ValueError, match="mu must be finite"):
        rgg.rgn_mean(1.0, math.nan, 1.0)
    for rate in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="rate"):
            rgg.mu_for_l0(1.0, rate)
    with pytest.raises(ValueError, match="q must be >= 0"):
        rgg.rgn_moment(-1, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        rgg.sample_gn((2, -1), 1.0)
    with pytest.raises(ValueError, match="shape"):
        rgg.sample_gn((2, 1.5), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="floating-point"):
        rgg.sample_gn(2, 1.0, dtype=torch.int64)
    with pytest.raises(ValueError, match="outside double precision"):
        rgg.rgn_moment(2, 1.0, 1e300, 1.0)  # (1e300)^2 has no double


def test_rgn_target_api() -> None:
    t = Target.from_spec(1.0, -3.0)
    assert (t.p, t.mu, t.sigma) == (1.0, -3.0, rgg.sigma_gn(1.0))
    assert t.expected_l0 == rgg.expected_l0(1.0, -3.0, t.sigma)
    assert t.expected_l1 == rgg.expected_l1(1.0, -3.0, t.sigma)
    assert t.mean == rgg.rgn_mean(1.0, -3.0, t.sigma) and t.var == rgg.rgn_var(1.0, -3.0, t.sigma)
    assert list(t.summary()) == ["p", "mu", "sigma", "expected_l0", "expected_l1", "mean", "var"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.mu = 0.0  # type: ignore[misc]
    assert Target.from_spec(2.0, 0.5, 0.3).sigma == 0.3
    assert Target.from_spec(2.0, 0.5, "rgn").var == pytest.approx(1.0, rel=1e-10)
    gen = torch.Generator().manual_seed(0)
    y = t.sample_gn((8, 16), generator=gen)
    assert y.shape == (8, 16) and (y < 0).any()
