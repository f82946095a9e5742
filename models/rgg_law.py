"""Closed-form law of the target: GN_p(mu, sigma) and its rectification RGN_p = law of ReLU(X) (docs/METHOD.md §1).

Kept free of torch so that `lpjepa target` and any planning code can query the law without paying for a torch
import; sampling lives in `models.rgg`, which re-exports everything here.

Parametrization (the method's): f(x) = p^(1-1/p) / (2 sigma Gamma(1/p)) exp(-|x - mu|^p / (p sigma^p)).
With the scale s = sigma * p^(1/p) and t = (x - mu) / s the standardized density is
p / (2 Gamma(1/p)) exp(-|t|^p), so every tail integral of t^k is an incomplete gamma function:
    int_a^inf t^k p / (2 Gamma(1/p)) exp(-t^p) dt = Gamma((k+1)/p) / (2 Gamma(1/p)) * Q((k+1)/p, a^p),
which is what all closed forms below are built from (Q = scipy.special.gammaincc, P = gammainc).
"""

from __future__ import annotations

import math
import sys
from numbers import Real

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import integrate, optimize, special

# brentq tolerance for sigma_RGN, relative (docs/METHOD.md asks for 1e-10 absolute with sigma ~ 1): round trips
# stay tight and p far from 1, where sigma is tiny or huge, keeps its digits.
_SIGMA_RTOL = 1e-12
# A binomial expansion of E[x^q] that cancels more than this (sum |terms| / |sum|) falls back to quadrature.
_MAX_CANCELLATION = 1e5


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    # bool is an int subclass; `p=True` is always a caller bug, never "1".
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    if positive and out <= 0:
        raise ValueError(f"{name} must be > 0, got {out!r}")
    return out


def check_p(p: object) -> float:
    """Validate the shape parameter: any finite p > 0 (p < 1 is allowed: sharper, heavier-tailed priors)."""
    return _finite("p", p, positive=True)


def check_sigma(sigma: object) -> float:
    return _finite("sigma", sigma, positive=True)


def check_mu(mu: object) -> float:
    return _finite("mu", mu)


def check_rate(rate: object) -> float:
    """An activation rate is a probability strictly inside (0, 1): 0 and 1 need mu = -inf / +inf."""
    out = _finite("rate", rate)
    if not 0.0 < out < 1.0:
        raise ValueError(f"activation rate must be strictly between 0 and 1, got {out!r}")
    return out


def _scale(p: float, sigma: float) -> float:
    """scipy's gennorm scale for the method's sigma; p so extreme that it under/overflows is rejected."""
    s = sigma * p ** (1.0 / p)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"p={p!r} with sigma={sigma!r} is outside the numerically representable range")
    return s


def _args(p: object, mu: object, sigma: object) -> tuple[float, float, float, float]:
    p_, mu_, sigma_ = check_p(p), check_mu(mu), check_sigma(sigma)
    return p_, mu_, sigma_, _scale(p_, sigma_)


def _log_half_gamma_ratio(k: float, p: float) -> float:
    """log of Gamma((k+1)/p) / (2 Gamma(1/p)) = log int_0^inf t^k dPhi(t) (logs: Gamma(1/p) overflows for small p)."""
    return float(special.gammaln((k + 1.0) / p) - special.gammaln(1.0 / p)) - math.log(2.0)


def _incomplete_pair(a: float, p: float, b: float) -> tuple[float, float]:
    """(P(a, b^p), Q(a, b^p)) for b >= 0, also where b^p leaves the double range (very large p or |b|)."""
    if b == 0.0:
        return 0.0, 1.0
    try:
        x = b**p
    except OverflowError:
        x = math.inf
    if math.isinf(x):
        return 1.0, 0.0
    if x < sys.float_info.min:  # underflow: P(a, x) = x^a / Gamma(a + 1) (1 + O(x)), with x^a = b^(a p)
        lower = math.exp(a * p * math.log(b) - float(special.gammaln(a + 1.0)))
        return lower, 1.0 - lower
    return float(special.gammainc(a, x)), float(special.gammaincc(a, x))


def _tail(k: int, p: float, mu: float, s: float) -> float:
    """s^k E[t^k ; t > c] with c = -mu/s, i.e. E[(X - mu)^k ; X > 0], free of internal cancellation.

    Below the mode (mu > 0) odd k uses Q directly instead of 1 - P; the prefactor is built in logs so tiny s
    with a huge Gamma ratio (small p) stays representable.
    """
    a = (k + 1.0) / p
    pref = math.exp(k * math.log(s) + _log_half_gamma_ratio(k, p))
    lower, upper = _incomplete_pair(a, p, abs(mu) / s)
    return pref * upper if mu <= 0 or k % 2 == 1 else pref * (1.0 + lower)


def _p_inactive(p: float, mu: float, s: float) -> float:
    """P(X <= 0), from the near side so a tiny tail keeps its digits."""
    tail = 0.5 * _incomplete_pair(1.0 / p, p, abs(mu) / s)[1]
    return tail if mu >= 0 else 1.0 - tail


def gn_pdf(x: ArrayLike, p: float, mu: float = 0.0, sigma: float = 1.0) -> NDArray[np.float64]:
    """Density of GN_p(mu, sigma), evaluated in log space so p far from 2 neither overflows nor underflows."""
    p, mu, sigma, s = _args(p, mu, sigma)
    u = np.abs((np.asarray(x, dtype=np.float64) - mu) / s)
    log_norm = math.log(p) - math.log(2.0 * s) - special.gammaln(1.0 / p)
    return np.exp(log_norm - u**p)[()]


def gn_cdf(x: ArrayLike, p: float, mu: float = 0.0, sigma: float = 1.0) -> NDArray[np.float64]:
    """CDF of GN_p(mu, sigma); each side from its own tail so P(X <= x) keeps relative accuracy far left."""
    p, mu, sigma, s = _args(p, mu, sigma)
    u = (np.asarray(x, dtype=np.float64) - mu) / s
    tail = 0.5 * special.gammaincc(1.0 / p, np.abs(u) ** p)
    return np.where(u < 0, tail, 1.0 - tail)[()]


def gn_sf(x: ArrayLike, p: float, mu: float = 0.0, sigma: float = 1.0) -> NDArray[np.float64]:
    """P(X > x), the complement computed directly (the activation rate is an sf at 0)."""
    p, mu, sigma, s = _args(p, mu, sigma)
    u = (np.asarray(x, dtype=np.float64) - mu) / s
    tail = 0.5 * special.gammaincc(1.0 / p, np.abs(u) ** p)
    return np.where(u > 0, tail, 1.0 - tail)[()]


def gn_ppf(q: ArrayLike, p: float, mu: float = 0.0, sigma: float = 1.0) -> NDArray[np.float64]:
    """Quantile of GN_p(mu, sigma) via the inverse upper incomplete gamma (accurate for tiny rates)."""
    p, mu, sigma, s = _args(p, mu, sigma)
    q = np.asarray(q, dtype=np.float64)
    if np.any(~np.isfinite(q)) or np.any((q < 0) | (q > 1)):
        raise ValueError("quantile levels must lie in [0, 1]")
    tail = 2.0 * np.minimum(q, 1.0 - q)  # P(|t| > a) for the matching |t|
    with np.errstate(divide="ignore"):
        a = special.gammainccinv(1.0 / p, tail) ** (1.0 / p)
    return (mu + s * np.where(q < 0.5, -a, a))[()]


def gn_var(p: float, sigma: float) -> float:
    """Var GN_p(mu, sigma) = sigma^2 p^(2/p) Gamma(3/p) / Gamma(1/p) (mu does not matter)."""
    p, sigma = check_p(p), check_sigma(sigma)
    return sigma**2 * math.exp(2.0 / p * math.log(p) + special.gammaln(3.0 / p) - special.gammaln(1.0 / p))


def sigma_gn(p: float) -> float:
    """sigma_GN: unit variance BEFORE rectification (1 for p = 2, 1/sqrt(2) for p = 1), docs/METHOD.md default."""
    p = check_p(p)
    out = math.exp(0.5 * (special.gammaln(1.0 / p) - special.gammaln(3.0 / p)) - math.log(p) / p)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"sigma_GN is not representable for p={p!r}")
    return out


def expected_l0(p: float, mu: float, sigma: float) -> float:
    """Expected activation rate E[||x||_0] / D = P(X > 0) = Phi_{GN_p(0,1)}(mu / sigma)."""
    p, mu, sigma, s = _args(p, mu, sigma)
    return _tail(0, p, mu, s)


def _moment_quad(q: float, p: float, mu: float, s: float) -> float:
    """E[ReLU(X)^q] by quadrature in standardized units, rescaled so the integrand lives on an O(1) range.

    Used for non-integer q and when the closed-form binomial sum cancels: both are off the hot path.
    """
    c = -mu / s
    log_norm = math.log(p) - math.log(2.0) - special.gammaln(1.0 / p)
    quad = {"epsabs": 0.0, "epsrel": 1e-11, "limit": 400}
    if c > 0:
        # x = s * w with t = c + w; factor exp(-c^p) out so a far tail does not underflow inside the integral.
        cp = c**p
        if cp > 800.0:  # exp(-c^p) underflows double precision: the moment is 0 to machine precision
            return 0.0
        h = c * math.expm1(math.log1p(c ** (-p)) / p)  # width where (c + w)^p - c^p reaches 1

        def excess(w: float) -> float:
            return cp * math.expm1(p * math.log1p(w / c))

        val, _ = integrate.quad(lambda v: (h * v) ** q * math.exp(-excess(h * v)), 0.0, math.inf, **quad)
        return s**q * math.exp(log_norm - cp) * h * val
    # mu >= 0: x = s * (t - c) on t > c; integrate the side below the mode (t in (c, 0)) and above it.
    b = -c
    upper = min(b, 800.0 ** (1.0 / p))  # beyond, exp(-u^p) is below double precision
    below = 0.0
    if upper > 0:
        below, _ = integrate.quad(lambda u: (b - u) ** q * math.exp(-(u**p)), 0.0, upper, **quad)
    above, _ = integrate.quad(lambda t: (t + b) ** q * math.exp(-(t**p)), 0.0, math.inf, **quad)
    return s**q * math.exp(log_norm) * (below + above)


def rgn_moment(q: float, p: float, mu: float, sigma: float) -> float:
    """E[x^q] for x ~ RGN_p(mu, sigma), q >= 0 (E[x^0] = 1 by the 0^0 = 1 convention).

    Integer q: binomial expansion of (mu + s t)^q over t > -mu/s, each term an incomplete gamma function;
    mu = 0: s^q Gamma((q+1)/p) / (2 Gamma(1/p)) for any q; otherwise (or if the sum cancels) quadrature.
    """
    q = _finite("q", q)
    if q < 0:
        raise ValueError(f"moment order q must be >= 0 (x has an atom at 0), got {q!r}")
    p, mu, sigma, s = _args(p, mu, sigma)
    try:
        value = _rgn_moment(q, p, mu, s)
    except OverflowError:
        value = math.inf
    return _representable(f"E[x^{q:g}]", value, p, mu, sigma)


def _representable(what: str, value: float, p: float, mu: float, sigma: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} of RGN_p is outside double precision for p={p!r}, mu={mu!r}, sigma={sigma!r}")
    return value


def _rgn_moment(q: float, p: float, mu: float, s: float) -> float:
    if q == 0:
        return 1.0
    if mu == 0:
        return math.exp(q * math.log(s) + _log_half_gamma_ratio(q, p))
    if q == int(q) and q <= 64:
        n = int(q)
        terms = [math.comb(n, k) * mu ** (n - k) * _tail(k, p, mu, s) for k in range(n + 1)]
        total = math.fsum(terms)
        scale = math.fsum(abs(t) for t in terms)
        if scale == 0.0:
            return 0.0
        if total > 0 and scale / total < _MAX_CANCELLATION:
            return total
    return max(_moment_quad(q, p, mu, s), 0.0)


def rgn_mean(p: float, mu: float, sigma: float) -> float:
    """E[ReLU(X)]."""
    return rgn_moment(1, p, mu, sigma)


def rgn_second_moment(p: float, mu: float, sigma: float) -> float:
    """E[ReLU(X)^2]."""
    return rgn_moment(2, p, mu, sigma)


def rgn_var(p: float, mu: float, sigma: float) -> float:
    """Var ReLU(X).

    For mu >= 0 it is computed as Var(ReLU(X) - mu) so a large mean does not cancel in E[x^2] - E[x]^2;
    for mu < 0 the raw moments are small and do not cancel.
    """
    p, mu, sigma, s = _args(p, mu, sigma)
    if mu < 0:
        m1, m2 = rgn_moment(1, p, mu, sigma), rgn_moment(2, p, mu, sigma)
        return max(m2 - m1 * m1, 0.0)
    # Y = ReLU(X) - mu = max(X - mu, -mu): same variance, and its moments are O(s^2), not O(mu^2).
    low = _p_inactive(p, mu, s)
    try:
        m1 = (-mu * low if low else 0.0) + _tail(1, p, mu, s)
        m2 = (mu * mu * low if low else 0.0) + _tail(2, p, mu, s)
        value = max(m2 - m1 * m1, 0.0)
    except OverflowError:
        value = math.inf
    return _representable("Var", value, p, mu, sigma)


def expected_l1(p: float, mu: float, sigma: float) -> float:
    """Expected l1 metric (E x)^2 / E x^2: the D -> inf limit of (1/D)(||z||_1/||z||_2)^2.

    It is <= 1 by Cauchy-Schwarz; 0 is returned when the second moment underflows (the limit mu -> -inf).
    """
    m2 = rgn_moment(2, p, mu, sigma)
    if m2 == 0.0:
        return 0.0
    m1 = rgn_moment(1, p, mu, sigma)
    return min(m1 * m1 / m2, 1.0)


def sigma_rgn(p: float, mu: float) -> float:
    """sigma_RGN: the sigma giving Var ReLU(X) = 1, by brentq on a bracket whose upper end doubles as needed.

    ReLU is 1-Lipschitz, so Var ReLU(X) <= Var X = 1 at sigma_GN: sigma_GN is always a valid lower end, which
    (unlike the reference's fixed [1e-8, 1]) also holds for p far from 1 where sigma_GN is tiny or huge.
    The root is located to a relative tolerance of 1e-12.
    """
    p, mu = check_p(p), check_mu(mu)

    def excess(sigma: float) -> float:
        return rgn_var(p, mu, sigma) - 1.0

    lo = sigma_gn(p)
    if excess(lo) >= 0:  # mu >> sigma: ReLU is the identity to double precision
        return lo
    hi = 2.0 * lo
    while excess(hi) < 0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            raise ValueError(f"no sigma gives unit variance after rectification for p={p!r}, mu={mu!r}")
    root = optimize.brentq(excess, lo, hi, xtol=_SIGMA_RTOL * lo, rtol=_SIGMA_RTOL, maxiter=500)
    return float(root)


def resolve_sigma(p: float, mu: float, sigma: str | float) -> float:
    """Turn a sigma spec into a number: 'gn' (unit variance before ReLU), 'rgn' (after) or a number > 0."""
    if isinstance(sigma, str):
        word = sigma.strip().lower()
        if word == "gn":
            return sigma_gn(p)
        if word == "rgn":
            return sigma_rgn(p, mu)
        try:
            sigma = float(word)
        except ValueError:
            raise ValueError(f"sigma must be 'gn', 'rgn' or a positive number, got {sigma!r}") from None
    return check_sigma(sigma)


def mu_for_l0(p: float, rate: float, sigma: str | float = "gn") -> tuple[float, float]:
    """(mu, sigma) whose expected activation rate is `rate`.

    The rate depends on mu / sigma only (rate = Phi(mu / sigma)), so z = Phi^-1(rate) fixes the ratio.
    With a fixed sigma (gn or a number) mu = z sigma. With sigma_RGN, mu and sigma are coupled, but ReLU
    is positively homogeneous: Var ReLU(sigma (z + T)) = sigma^2 Var ReLU(z + T), hence
    sigma = 1 / sqrt(rgn_var(p, z, 1)) solves the joint system exactly, with no 2-D root finding
    (tests check it against brentq's sigma_rgn(p, mu)).
    """
    p, rate = check_p(p), check_rate(rate)
    z = float(gn_ppf(rate, p, 0.0, 1.0))
    if isinstance(sigma, str) and sigma.strip().lower() == "rgn":
        v = rgn_var(p, z, 1.0)
        if not v > 0:
            raise ValueError(f"rate {rate!r} is too small to reach unit variance after rectification")
        sig = 1.0 / math.sqrt(v)
    else:
        sig = resolve_sigma(p, 0.0, sigma)  # 'gn' or a number: independent of mu
    mu = z * sig
    if not math.isfinite(mu):
        raise ValueError(f"rate {rate!r} needs a mu that is not representable")
    return mu, sig


def target_summary(p: float, mu: float, sigma: float) -> dict[str, float]:
    """The fields `lpjepa target --json` prints, in its key order."""
    p, mu, sigma, _ = _args(p, mu, sigma)
    return {
        "p": p,
        "mu": mu,
        "sigma": sigma,
        "expected_l0": expected_l0(p, mu, sigma),
        "expected_l1": expected_l1(p, mu, sigma),
        "mean": rgn_mean(p, mu, sigma),
        "var": rgn_var(p, mu, sigma),
    }
