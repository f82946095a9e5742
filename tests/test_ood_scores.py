"""Activation OOD scores and calibration on synthetic rectified embeddings with known shifts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import sparse, stats

from ood import CalibrationError, OODScorer, calibrate
from ood.calibration import conformal_threshold
from ood.metrics import auroc
from ood.scores import SmoothedECDF, activation_matrix, l0_fraction

DIM = 256


def rectified(rng: np.random.Generator, n: int, mus: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """ReLU of Laplace samples with a per-dimension location: heterogeneous firing rates, like a trained model."""
    return np.maximum(rng.laplace(mus + shift, 1 / math.sqrt(2), size=(n, mus.size)), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(1234)
    mus = rng.normal(-1.0, 0.6, DIM)
    return rng, mus


# ------------------------------------------------------------------------------------------ building blocks
def test_smoothed_ecdf_matches_scipy_gaussian_kde():
    rng = np.random.default_rng(0)
    data = rng.gamma(3.0, 0.05, size=400)
    ecdf = SmoothedECDF.fit(data, max_knots=1024)
    kde = stats.gaussian_kde(data, bw_method=ecdf.bandwidth / np.std(data, ddof=1))
    xs = np.linspace(data.min() - 0.1, data.max() + 0.1, 25)
    want = np.array([kde.integrate_box_1d(-np.inf, x) for x in xs])
    np.testing.assert_allclose(ecdf.cdf(xs), want, rtol=1e-6, atol=1e-9)


def test_two_sided_score_keeps_growing_in_far_tails():
    ecdf = SmoothedECDF(knots=np.array([0.3]), bandwidth=0.01)
    xs = np.array([0.3, 0.35, 0.5, 1.0, 0.0, -0.5])
    got = ecdf.two_sided_score(xs)
    want = -(np.log(2.0) + stats.norm.logsf(np.abs(xs - 0.3) / 0.01))
    np.testing.assert_allclose(got, np.maximum(want, 0.0), rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(got)) and got[3] > got[2] > got[1] > got[0] == 0.0
    assert got[5] > got[4] > got[1]  # the lower tail counts as much as the upper one


def test_activation_matrix_ignores_explicit_zeros_and_rejects_nan():
    dense = np.array([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    csr = sparse.csr_matrix(dense)
    csr.data = np.r_[csr.data, 0.0].astype(np.float32)[: csr.nnz]
    with_zero = sparse.csr_matrix((np.array([1.5, 0.0, 2.0]), np.array([1, 2, 3]), np.array([0, 3, 3])), shape=(2, 4))
    for emb in (dense, csr, with_zero):
        np.testing.assert_array_equal(l0_fraction(activation_matrix(emb)), [0.5, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        activation_matrix(np.array([[np.nan, 1.0]]))


def test_conformal_threshold_order_statistic():
    scores = np.arange(1.0, 101.0)  # 1..100
    assert conformal_threshold(scores, 0.95) == 96.0  # ceil(101 * 0.95) = 96th smallest
    assert conformal_threshold(scores[:10], 0.95) == 10.0  # capped at the maximum


# ------------------------------------------------------------------------------------------ calibration
def test_pattern_score_is_bernoulli_nll_per_dimension(world):
    rng, mus = world
    train = rectified(rng, 600, mus)
    cal = calibrate(train, seed=3)
    scorer = OODScorer.from_calibration(cal)
    # Laplace smoothing: rates are (count + 1) / (n_fit + 2) over the fit part.
    order = np.random.default_rng(3).permutation(600)
    fit = (train[order[: cal["n_fit"]]] != 0).sum(axis=0)
    np.testing.assert_allclose(scorer.rates, (fit + 1.0) / (cal["n_fit"] + 2.0), rtol=1e-12)

    x = rectified(rng, 50, mus, shift=0.4)
    want = -stats.bernoulli.logpmf((x != 0).astype(int), scorer.rates[None, :]).sum(axis=1) / DIM
    np.testing.assert_allclose(scorer.score(x).pattern_score, want, rtol=1e-10)
    np.testing.assert_allclose(scorer.score(sparse.csr_matrix(x)).pattern_score, want, rtol=1e-10)


def test_dimension_never_fired_in_calibration_gives_finite_scores(world):
    rng, mus = world
    train = rectified(rng, 200, mus)
    train[:, 7] = 0.0  # dead in calibration
    scorer = OODScorer.from_calibration(calibrate(train))
    assert 0.0 < scorer.rates[7] < 0.01
    x = rectified(rng, 5, mus)
    x[:, 7] = 3.0
    out = scorer.score(x)
    assert np.all(np.isfinite(out.score)) and np.all(np.isfinite(out.pattern_score))
    assert np.all(out.pattern_score > scorer.score(np.where(np.arange(DIM) == 7, 0.0, x)).pattern_score)


def test_threshold_keeps_tpr_on_fresh_in_distribution_data(world):
    rng, mus = world
    tprs = []
    for seed in range(4):
        cal = calibrate(rectified(rng, 3000, mus), seed=seed)
        assert cal["holdout_tpr"]["combined"] >= 0.95
        fresh = OODScorer.from_calibration(cal).score(rectified(rng, 3000, mus))
        tprs.append(1.0 - fresh.is_ood.mean())
    # binomial sd of one estimate ~0.004 plus the held-out quantile's own noise ~0.005
    assert all(0.93 <= t <= 0.97 for t in tprs), tprs
    assert abs(np.mean(tprs) - 0.95) < 0.01, tprs


def test_known_shifts_each_score_sees_its_own(world):
    rng, mus = world
    cal = calibrate(rectified(rng, 3000, mus))
    scorer = OODScorer.from_calibration(cal)
    id_eval = scorer.score(rectified(rng, 1000, mus))
    denser = scorer.score(rectified(rng, 1000, mus, shift=0.4))
    sparser = scorer.score(rectified(rng, 1000, mus, shift=-0.4))
    # Same overall rate, but the dimensions' roles are permuted: only the pattern can tell.
    permuted = scorer.score(rectified(rng, 1000, mus[np.random.default_rng(9).permutation(DIM)]))

    assert abs(denser.l0.mean() - id_eval.l0.mean()) > 0.05
    for shifted in (denser, sparser):  # two-sided
        assert auroc(id_eval.rate_score, shifted.rate_score) > 0.95
        assert auroc(id_eval.score, shifted.score) > 0.9
        assert shifted.is_ood.mean() > 0.7
    assert abs(auroc(id_eval.rate_score, permuted.rate_score) - 0.5) < 0.06
    assert auroc(id_eval.pattern_score, permuted.pattern_score) > 0.9
    assert auroc(id_eval.score, permuted.score) > 0.8


def test_calibration_json_round_trip_and_records(world):
    rng, mus = world
    cal = calibrate(sparse.csr_matrix(rectified(rng, 400, mus)), expected_l0=0.25, source={"spec": "synthetic"})
    text = json.dumps(cal)
    back = json.loads(text)
    assert back["version"] == 2 and back["dim"] == DIM and back["l0"]["expected"] == 0.25
    x = rectified(rng, 20, mus)
    a, b = OODScorer.from_calibration(cal).score(x), OODScorer.from_calibration(back).score(x)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.is_ood, a.score > OODScorer.from_calibration(cal).threshold)
    records = a.to_records()
    assert len(records) == 20
    assert set(records[0]) == {"score", "l0", "is_ood", "rate_score", "pattern_score"}
    assert isinstance(records[0]["is_ood"], bool) and isinstance(records[0]["score"], float)
    json.dumps(records)
    single = OODScorer.from_calibration(cal).score(x[0])
    assert len(single) == 1 and single.score[0] == pytest.approx(a.score[0])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("version"), "version"),
        (lambda c: c.update(version=99), "version 99"),
        (lambda c: c.update(rates=c["rates"][:-1]), "rates"),
        (lambda c: c["rates"].__setitem__(0, float("nan")), "rates"),
        (lambda c: c["l0"].pop("knots"), "knots"),
        (lambda c: c["l0"].update(bandwidth=-1.0), "bandwidth"),
        (lambda c: c["thresholds"].pop("combined"), "combined"),
        (lambda c: c.pop("normalization"), "normalization"),
    ],
)
def test_bad_calibration_is_rejected_with_a_named_field(world, mutate, message):
    rng, mus = world
    cal = json.loads(json.dumps(calibrate(rectified(rng, 100, mus))))
    mutate(cal)
    with pytest.raises(CalibrationError, match=message):
        OODScorer.from_calibration(cal)


def test_bad_inputs_raise_clear_errors(world):
    rng, mus = world
    with pytest.raises(CalibrationError, match="at least 40"):
        calibrate(rectified(rng, 30, mus))
    with pytest.raises(CalibrationError, match="tpr"):
        calibrate(rectified(rng, 100, mus), tpr=1.0)
    scorer = OODScorer.from_calibration(calibrate(rectified(rng, 100, mus)))
    with pytest.raises(ValueError, match="255 dimensions; the calibration has 256"):
        scorer.score(np.ones((2, DIM - 1)))
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(np.full((1, DIM), np.inf))
    with pytest.raises(CalibrationError, match="JSON object"):
        OODScorer.from_calibration([1, 2])  # type: ignore[arg-type]


def test_degenerate_dense_codes_do_not_crash():
    """A non-rectified model fires every dimension on every input: the scores are constant, not NaN."""
    rng = np.random.default_rng(5)
    cal = calibrate(rng.normal(size=(100, 32)).astype(np.float32))
    out = OODScorer.from_calibration(cal).score(rng.normal(size=(10, 32)))
    assert np.all(np.isfinite(out.score)) and not out.is_ood.any()
