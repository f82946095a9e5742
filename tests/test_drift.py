"""Drift monitor: exact null of the l0 test, Monte Carlo false-alarm rate, detection of a shifted stream, and
thread safety. Codes are synthetic with correlated dimensions (a shared latent), like a trained model's."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import sparse, stats

from ood import calibrate
from ood.drift import DriftMonitor, chi_square, chi_weights, disabled_snapshot, three_moment, window_sum_tails

DIM = 64


def stream(rng: np.random.Generator, n: int, loc: np.ndarray, latent: float = 0.8) -> np.ndarray:
    """Rectified codes whose dimensions fire together through one shared latent factor per image."""
    z = rng.normal(size=(n, 1))
    return np.maximum(loc + latent * z + rng.normal(0, 0.7, (n, loc.size)), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    loc = rng.normal(-0.6, 0.6, DIM)
    cal = calibrate(stream(rng, 6000, loc), seed=0, drift_window=32)
    return loc, cal


def test_window_sum_tails_match_direct_convolution_and_binomial():
    pmf = np.array([0.5, 0.3, 0.15, 0.05])
    cdf, sf = window_sum_tails(pmf, 5)
    direct = pmf
    for _ in range(4):
        direct = np.convolve(direct, pmf)
    np.testing.assert_allclose(cdf, np.cumsum(direct), atol=1e-12)
    np.testing.assert_allclose(sf, np.cumsum(direct[::-1])[::-1], atol=1e-12)
    cdf, _ = window_sum_tails(np.array([0.9, 0.1]), 64)  # Bernoulli(0.1) summed over 64: Binomial(64, 0.1)
    np.testing.assert_allclose(cdf, stats.binom.cdf(np.arange(65), 64, 0.1), rtol=1e-9, atol=1e-14)


def test_three_moment_null_recovers_a_shifted_chi_square_and_its_tail():
    """5 + 2 chi2_7 (skew sqrt(8/7)): the fit recovers shift, scale and df, and its 1e-4 tail quantile is the true
    one within 3%, where a two-moment g chi2_h fit of the same sample (shift 0) is more than 5% short."""
    x = 5.0 + 2.0 * np.random.default_rng(0).chisquare(7, 400_000)
    fit = three_moment([x[:200_000], x[200_000:]])
    assert fit["shift"] == pytest.approx(5.0, abs=1.0)
    assert fit["scale"] == pytest.approx(2.0, rel=0.05)
    assert fit["df"] == pytest.approx(7.0, rel=0.1)
    assert fit["skew"] == pytest.approx(stats.skew(x, bias=False))
    true_q = 5.0 + 2.0 * stats.chi2.isf(1e-4, 7)
    assert fit["shift"] + fit["scale"] * stats.chi2.isf(1e-4, fit["df"]) == pytest.approx(true_q, rel=0.03)
    mean, var = x.mean(), x.var(ddof=1)
    two = var / (2 * mean) * stats.chi2.isf(1e-4, 2 * mean**2 / var)
    assert two < 0.95 * true_q
    left = 100.0 - np.random.default_rng(1).chisquare(5, 50_000)  # skewed to the left: the two-moment fit
    fit = three_moment([left])
    assert fit["skew"] < 0 and fit["shift"] == 0.0
    assert fit["df"] == pytest.approx(2 * left.mean() ** 2 / left.var(ddof=1))


def test_chi_square_statistic_by_hand():
    rates = np.array([0.5, 0.01, 0.2])
    expected, inv_var = chi_weights(rates, 10)
    counts = np.array([7, 1, 2])
    want = (7 - 5) ** 2 / 2.5 + (1 - 0.1) ** 2 / 1.0 + (2 - 2) ** 2 / 1.6
    assert float(chi_square(counts, expected, inv_var)) == pytest.approx(want)


def test_incremental_window_state_matches_a_numpy_recomputation(world):
    """The monitor updates T^2 and Q from the dimensions whose counts change; after every request (one or several
    images, mid-window and across the once-per-window refresh) they equal a float64 numpy recomputation from the
    window's own counts: T^2 = sum_k (w_k . d)^2 / lambda_k, Q = sum_j d_j^2 / var_j - sum_k (w_k . d)^2."""
    loc, cal = world
    mon = DriftMonitor.from_calibration(cal)
    rng = np.random.default_rng(3)
    expected, inv_var = chi_weights(mon.rates, mon.window)
    weights = mon._weights
    for request in range(3 * mon.window):
        mon.observe_dense(stream(rng, 1 + request % 3, loc + (0.5 if request > mon.window else 0.0)))
        if mon._count < mon.window:
            continue
        counts = np.bincount(np.concatenate(mon.window_rows()), minlength=DIM)
        d = counts - expected
        t = weights @ d
        assert mon._t2 == pytest.approx(float(np.sum(t * t * mon._inv_lam)), rel=1e-9, abs=1e-9)
        assert mon._q == pytest.approx(float(np.sum(d * d * inv_var) - np.sum(t * t)), rel=1e-9, abs=1e-9)


def test_id_stream_raises_no_alarm_and_shifted_stream_does(world):
    loc, cal = world
    rng = np.random.default_rng(1)
    mon = DriftMonitor.from_calibration(cal, false_alarm_rate=1e-4)
    assert mon is not None and mon.window == 32
    assert mon.snapshot()["pvalue"] is None  # window not yet full
    for row in stream(rng, 3000, loc):
        mon.observe_dense(row)
    snap = mon.snapshot()
    assert snap["alarms"] == 0 and not snap["alarm"] and snap["pvalue"] > 1e-4
    assert snap["window_count"] == 32 and abs(snap["window_l0"] - cal["l0"]["mean"]) < 0.1
    # Same mean activation rate, different dimensions: only the pattern test can see it.
    shifted = np.roll(loc, 7)
    seen = 0
    for row in stream(rng, 200, shifted):
        seen += 1
        if mon.observe_dense(row):
            break
    assert mon.alarm and seen <= 32, seen
    p, p_l0, p_pat = mon.pvalues()
    assert p < 1e-4 and p_pat < p_l0


def test_false_alarm_rate_by_monte_carlo(world):
    """Independent ID windows (a fresh monitor each, one evaluation per window): the rejection rate must not
    exceed the configured rate beyond sampling error, and must not be zero (a test that never rejects has no
    power to check)."""
    loc, cal = world
    rng = np.random.default_rng(2)
    alpha, trials = 0.02, 2500
    mon = DriftMonitor.from_calibration(cal, false_alarm_rate=alpha)
    codes = stream(rng, trials * mon.window, loc)
    active = sparse.csr_matrix(codes)
    rejections = 0
    for t in range(trials):
        mon.reset()
        block = active[t * mon.window : (t + 1) * mon.window]
        rejections += mon.observe_csr(block)
    rate = rejections / trials
    upper = alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert 0.2 * alpha < rate <= upper, rate
    # The combined p-value is Bonferroni: the alarm is exactly p < alpha.
    p, _, _ = mon.pvalues()
    assert (p < alpha) == mon.alarm


def test_observe_is_thread_safe_and_memory_is_bounded(world):
    loc, cal = world
    mon = DriftMonitor.from_calibration(cal)
    rows = stream(np.random.default_rng(3), 4000, loc)

    def feed(part: np.ndarray) -> None:
        for i in range(0, len(part), 3):
            mon.observe_dense(part[i : i + 3])

    threads = [threading.Thread(target=feed, args=(rows[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.images == 4000
    ring = mon.window_rows()
    assert len(ring) == mon.window and mon._ring.shape == (mon.window, DIM)  # memory bounded by W x D
    counts = np.zeros(DIM, dtype=np.int64)
    for r in ring:
        counts[r] += 1
    np.testing.assert_array_equal(mon._counts, counts)  # the running counts are exactly the ring's
    assert mon._l0_sum == sum(r.size for r in ring)


def test_disabled_without_drift_section_and_bad_rate(world):
    _, cal = world
    assert DriftMonitor.from_calibration(None) is None
    assert DriftMonitor.from_calibration({k: v for k, v in cal.items() if k != "drift"}) is None
    with pytest.raises(ValueError, match="false_alarm_rate"):
        DriftMonitor.from_calibration(cal, false_alarm_rate=0.0)
    snap = disabled_snapshot(1e-4, 0.5)
    assert snap["enabled"] is False and snap["pvalue"] is None and snap["target_l0"] == 0.5
