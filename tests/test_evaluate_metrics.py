"""Sparsity metrics on hand-made matrices and Monte Carlo against closed forms; nHSIC against an explicit numpy
implementation of its definition and against a permutation null."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.rgg_law import expected_l0, expected_l1
from pretrain.evaluate.nhsic import centred_gram, nhsic, nhsic_matrix, nhsic_pair
from pretrain.evaluate.sparsity import (
    dead_fraction,
    dimension_rates,
    l0_fraction,
    l1_metric,
    l1_metric_rows,
    rate_report,
    sparsity_report,
)


def test_l0_and_dead_dims_on_a_hand_made_matrix():
    z = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, -1e-30]])
    assert l0_fraction(z) == pytest.approx(4 / 12)
    assert dead_fraction(z) == pytest.approx(1 / 4)  # column 2 only; a tiny non-zero still fires
    rep = sparsity_report(z)
    assert rep["dead_dims_count"] == 1 and rep["zero_rows"] == 0


def test_l1_metric_extremes():
    d = 16
    assert l1_metric(torch.eye(d)) == pytest.approx(1 / d)  # one-hot rows
    assert l1_metric(torch.full((3, d), -2.5)) == pytest.approx(1.0)  # constant magnitude
    z = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = l1_metric_rows(z)
    assert rows[0].item() == pytest.approx((7 / 5) ** 2 / 4)
    assert rows[1].item() == 0.0  # an all-zero row counts as 0, and is reported
    assert sparsity_report(z)["zero_rows"] == 1


def test_l1_metric_of_gaussian_rows_is_two_over_pi():
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(2000, 1024)))
    # E[(1/D)(||z||_1/||z||_2)^2] = 2/pi + O(1/D); the row-to-row spread is O(1/sqrt(D)) / sqrt(2000)
    assert l1_metric(z) == pytest.approx(2 / math.pi, abs=3e-3)


@pytest.mark.parametrize(("p", "mu"), [(2.0, 0.0), (1.0, -1.0), (1.0, 0.5)])
def test_sparsity_of_rectified_samples_matches_the_closed_forms(p, mu):
    """ReLU of GN_p(mu, sigma) samples (scipy.stats.gennorm) against models.rgg_law's expected l0 and l1."""
    sigma = 1.0 if p == 2 else 1 / math.sqrt(2)
    x = stats.gennorm.rvs(beta=p, loc=mu, scale=sigma * p ** (1 / p), size=(1000, 1024), random_state=7)
    z = torch.tensor(np.maximum(x, 0.0))
    assert l0_fraction(z) == pytest.approx(expected_l0(p, mu, sigma), abs=2e-3)
    assert l1_metric(z) == pytest.approx(expected_l1(p, mu, sigma), abs=1e-2)


def _nhsic_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The definition written out: Gaussian kernels with the median of the non-zero |differences|, the biased
    HSIC tr(KHLH)/(n-1)^2 with an explicit centring matrix, normalised by the self-HSICs."""
    n = len(x)
    hmat = np.eye(n) - np.ones((n, n)) / n

    def gram(v):
        d = np.abs(v[:, None] - v[None, :])
        upper = d[np.triu_indices(n, 1)]
        h = np.median(upper[upper > 0])
        return np.exp(-(d**2) / (2 * h * h))

    def hsic(k, l):
        return np.trace(k @ hmat @ l @ hmat) / (n - 1) ** 2

    k, l = gram(x), gram(y)
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_nhsic_pair_matches_the_explicit_definition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=120)
    y = np.maximum(x + rng.normal(size=120), 0)  # rectified: many exact zeros, median over non-zero distances
    assert nhsic_pair(torch.tensor(x), torch.tensor(y)) == pytest.approx(_nhsic_reference(x, y), rel=1e-10)
    assert nhsic_pair(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0)
    assert math.isnan(nhsic_pair(torch.tensor(x), torch.zeros(120)))


def test_nhsic_sees_nonlinear_dependence_that_correlation_misses():
    rng = np.random.default_rng(2)
    n = 400
    x = rng.normal(size=n)
    dependent = x**2
    independent = rng.normal(size=n)
    assert abs(np.corrcoef(x, dependent)[0, 1]) < 0.15  # covariance-blind
    dep = nhsic_pair(torch.tensor(x), torch.tensor(dependent))
    ind = nhsic_pair(torch.tensor(x), torch.tensor(independent))
    # Permutation null: shuffling y breaks any dependence; permuting a sample permutes the rows and columns of
    # its centred Gram matrix, so 500 shuffles cost 500 gathers instead of 500 Gram matrices.
    kx, ky = centred_gram(torch.tensor(x)), centred_gram(torch.tensor(dependent))
    norm = float(torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky))
    null = []
    for _ in range(500):
        perm = torch.from_numpy(rng.permutation(n))
        null.append(float((kx * ky[perm][:, perm]).sum()) / norm)
    assert dep > 10 * max(null)
    assert ind <= np.quantile(null, 0.99)  # indistinguishable from the null
    assert ind < 0.02


def test_nhsic_of_embeddings_excludes_dead_and_constant_dims():
    rng = np.random.default_rng(3)
    n = 300
    x = rng.normal(size=n)
    cols = [np.maximum(rng.normal(size=n), 0) for _ in range(4)]
    z_ind = np.stack([*cols, np.zeros(n), np.zeros(n)], axis=1)  # two dead dims
    res = nhsic(torch.tensor(z_ind), n_samples=n)
    assert res.live_dims == 4 and res.pairs == 6 and res.samples == n
    assert res.value < 0.03
    z_dep = np.stack([x, x**2, np.abs(x), np.maximum(x, 0)], axis=1)
    dep = nhsic(torch.tensor(z_dep), n_samples=n)
    assert dep.value > 0.3
    # the matrix form equals the pairwise definition
    mat = nhsic_matrix(torch.tensor(z_dep))
    assert mat[0, 1].item() == pytest.approx(nhsic_pair(torch.tensor(x), torch.tensor(x**2)), rel=1e-10)
    # at most max_dims dimensions are used: all pairs among them
    wide = nhsic(torch.tensor(rng.normal(size=(200, 40))), n_samples=200, max_dims=5)
    assert wide.pairs == 10 and wide.live_dims == 40


def test_nhsic_with_fewer_than_two_live_dims_is_none():
    z = torch.zeros(50, 5)
    z[:, 2] = torch.rand(50)
    res = nhsic(z)
    assert res.value is None and res.pairs == 0 and res.live_dims == 1


def test_metric_input_errors():
    with pytest.raises(ValueError):
        l0_fraction(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        nhsic(torch.zeros(1, 3))


def test_rate_report_against_numpy():
    """Per-dimension rates, their percentiles (numpy's linear interpolation), the relative l0 error and the
    near-dead count (rate < 10% of the target) on a matrix with known column rates."""
    rng = np.random.default_rng(0)
    col_rates = np.array([0.0, 0.001, 0.004, 0.02, 0.05, 0.3, 0.5, 0.9])
    z = (rng.random((20000, 8)) < col_rates) * rng.exponential(size=(20000, 8))
    t = torch.from_numpy(z)
    rates = (z != 0).mean(0)
    np.testing.assert_allclose(dimension_rates(t).numpy(), rates)
    rep = rate_report(t, target_l0=0.05)
    for q in (5, 25, 50, 75, 95):
        assert rep[f"rate_p{q:02d}"] == pytest.approx(np.percentile(rates, q), rel=1e-12)
    assert rep["l0_rel_err"] == pytest.approx((rates.mean() - 0.05) / 0.05, rel=1e-12)
    assert rep["near_dead_dims"] == int((rates < 0.005).sum()) == 3  # the columns at 0, 0.001 and 0.004
    assert rep["near_dead_frac"] == pytest.approx(3 / 8)
    none = rate_report(t, target_l0=None)
    assert none["l0_rel_err"] is None and none["near_dead_dims"] is None
