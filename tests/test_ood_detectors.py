"""Multi-dimension OOD detectors, the score suite and the evidence-based choice of the served score.

Each detector is checked against an independent computation: scipy's Bernoulli log-pmf for the mixture,
sklearn's probabilistic PCA for the low-rank Gaussian, sklearn's Ledoit-Wolf for the full Gaussian.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import sparse, stats
from scipy.special import logsumexp

from ood import CalibrationError, calibrate
from ood.detectors import (
    BernoulliMixture,
    GaussianMahalanobis,
    Inputs,
    LowRankGaussian,
    detector_from_state,
)
from ood.metrics import auroc
from ood.selection import select_served
from ood.suite import ScoreSuite

DIM = 96


def clustered_codes(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.7) -> np.ndarray:
    """Rectified codes from a few prototypes: which dimensions fire depends on the (hidden) cluster."""
    k = rng.integers(0, centres.shape[0], n)
    return np.maximum(centres[k] + rng.normal(0, spread, (n, centres.shape[1])), 0.0).astype(np.float32)


@pytest.fixture(scope="module")
def centres():
    return np.random.default_rng(7).normal(-0.8, 1.0, (6, DIM))


# ------------------------------------------------------------------------------------------ detectors vs references
def test_bernoulli_mixture_likelihood_matches_scipy(centres):
    rng = np.random.default_rng(0)
    active = (clustered_codes(rng, 400, centres) > 0).astype(np.float64)
    model = BernoulliMixture.fit(sparse.csr_matrix(active), k=4, seed=0)
    x = active[:25]
    per_k = np.stack(
        [stats.bernoulli.logpmf(x, model.rates[k][None, :]).sum(axis=1) for k in range(model.rates.shape[0])],
        axis=1,
    )
    want = logsumexp(per_k + model.log_weights[None, :], axis=1)
    np.testing.assert_allclose(model.log_likelihood(sparse.csr_matrix(x)), want, rtol=1e-10, atol=1e-8)
    assert np.isclose(logsumexp(model.log_weights), 0.0)


def test_bernoulli_mixture_beats_independent_dimensions_on_clustered_patterns(centres):
    """EM finds the clusters: held-out likelihood above the single-component (independent Bernoulli) model,
    which is the pattern score's model."""
    rng = np.random.default_rng(1)
    train = sparse.csr_matrix((clustered_codes(rng, 2000, centres) > 0).astype(np.float64))
    test = sparse.csr_matrix((clustered_codes(rng, 500, centres) > 0).astype(np.float64))
    one = BernoulliMixture.fit(train, k=1)
    six = BernoulliMixture.fit(train, k=6, seed=0)
    assert six.log_likelihood(test).mean() > one.log_likelihood(test).mean() + 0.05 * DIM
    rates = (np.asarray(train.sum(axis=0)).ravel() + 1) / (train.shape[0] + 2)
    np.testing.assert_allclose(one.rates[0], rates, rtol=1e-9)


def test_lowrank_gaussian_matches_sklearn_probabilistic_pca(centres):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    x = clustered_codes(rng, 600, centres).astype(np.float64)
    model = LowRankGaussian.fit(x, rank=10, input_name="codes")
    pca = PCA(n_components=10, svd_solver="full").fit(x)
    assert model.noise == pytest.approx(pca.noise_variance_, rel=1e-8)
    q = x[:30] - pca.mean_
    want = np.einsum("ij,jk,ik->i", q, pca.get_precision(), q)
    np.testing.assert_allclose(model.mahalanobis(sparse.csr_matrix(x[:30])), want, rtol=1e-7)


def test_gaussian_mahalanobis_matches_sklearn_ledoit_wolf(centres):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(3)
    x = clustered_codes(rng, 300, centres).astype(np.float64)
    model = GaussianMahalanobis.fit(x, input_name="codes")
    lw = LedoitWolf().fit(x)
    assert model.shrinkage == pytest.approx(lw.shrinkage_, rel=1e-6)
    got = model.score(Inputs.from_arrays(x[:40]))
    np.testing.assert_allclose(got, lw.mahalanobis(x[:40]), rtol=1e-4)


@pytest.mark.parametrize("kind", ["mixture", "lowrank", "gaussian"])
def test_detector_state_round_trips_through_json(centres, kind):
    rng = np.random.default_rng(4)
    x = clustered_codes(rng, 300, centres)
    inputs = Inputs.from_arrays(x)
    det = {
        "mixture": lambda: BernoulliMixture.fit(inputs.active, k=3),
        "lowrank": lambda: LowRankGaussian.fit(inputs.codes, rank=8, input_name="codes"),
        "gaussian": lambda: GaussianMahalanobis.fit(inputs.codes, input_name="codes"),
    }[kind]()
    back = detector_from_state(json.loads(json.dumps(det.state())), "detectors.x")
    np.testing.assert_allclose(back.score(inputs), det.score(inputs), rtol=2e-4, atol=1e-6)  # float32 storage


def test_bad_detector_state_names_the_field(centres):
    det = BernoulliMixture.fit(sparse.csr_matrix(np.eye(8)), k=2).state()
    bad = dict(det, rates={"dtype": "float32", "shape": [2, 8], "b64": "!!"})
    with pytest.raises(CalibrationError, match="detectors.m.rates"):
        detector_from_state(bad, "detectors.m")
    with pytest.raises(CalibrationError, match="no known detector type"):
        detector_from_state({"type": "nope"}, "detectors.m")


# ------------------------------------------------------------------------------------------ suite and selection
def test_calibration_serves_the_score_that_sees_the_validation_shift(centres):
    """ID codes come from six prototypes; the OOD set from two others. Only scores that model which dimensions
    fire together can tell: the per-dimension rates of the shifted set are close to the ID rates by design."""
    rng = np.random.default_rng(5)
    x = clustered_codes(rng, 3000, centres)
    feats = rng.normal(size=(3000, 12)).astype(np.float32)
    others = np.random.default_rng(70).normal(-0.8, 1.0, (2, DIM))
    ood = clustered_codes(rng, 400, others)
    val = {"other_prototypes": Inputs.from_arrays(ood, rng.normal(size=(400, 12)))}
    cal = calibrate(Inputs.from_arrays(x, feats), validation=val, seed=0, mixture_k=8, rank=8)
    cal = json.loads(json.dumps(cal))
    sel = cal["selection"]
    assert {r["score"] for r in sel["table"]} == set(cal["scores"])
    best = max(s["min_auroc"] for s in sel["summary"].values())
    assert sel["summary"][cal["served"]]["min_auroc"] >= best - 0.005
    assert sel["summary"][cal["served"]]["min_auroc"] > 0.9
    assert sel["summary"]["feature_mahalanobis"]["min_auroc"] < 0.6  # features carry no signal here
    suite = ScoreSuite.from_calibration(cal)
    fresh = clustered_codes(rng, 2000, centres)
    out = suite.score(fresh, rng.normal(size=(2000, 12)))
    assert out.score_name == cal["served"] and out.threshold == cal["scores"][cal["served"]]["threshold"]
    assert 0.93 <= 1 - out.is_ood.mean() <= 0.97  # the conformal threshold keeps the ID TPR on fresh data
    test_ood = suite.score(clustered_codes(rng, 500, others), rng.normal(size=(500, 12)))
    assert auroc(out.score, test_ood.score) > 0.9
    rec = out.to_records()[0]
    assert rec["score_name"] == cal["served"] and set(rec) >= {"score", "is_ood", "l0", "threshold"}


def test_feature_score_is_served_when_only_the_features_shift(centres):
    rng = np.random.default_rng(6)
    x = clustered_codes(rng, 1500, centres)
    feats = rng.normal(size=(1500, 10)).astype(np.float32)
    val_feats = rng.normal(0.8, 1.0, size=(400, 10))  # the codes are ID; only the features moved
    val = {"feature_shift": Inputs.from_arrays(clustered_codes(rng, 400, centres), val_feats)}
    cal = calibrate(Inputs.from_arrays(x, feats), validation=val, seed=0, mixture_k=4, rank=8)
    assert cal["served"] == "feature_mahalanobis", cal["selection"]["reason"]
    suite = ScoreSuite.from_calibration(cal)
    assert suite.needs_features()
    with pytest.raises(ValueError, match="encoder features"):
        suite.score(x[:3])


def test_selection_rule_worst_case_then_fpr():
    rng = np.random.default_rng(8)
    held = {"a": rng.normal(size=500), "b": rng.normal(size=500), "c": rng.normal(size=500)}
    val = {
        "s1": {"a": rng.normal(3, 1, 300), "b": rng.normal(1.0, 1, 300), "c": rng.normal(1.5, 1, 300)},
        "s2": {"a": rng.normal(0.2, 1, 300), "b": rng.normal(1.0, 1, 300), "c": rng.normal(1.5, 1, 300)},
    }
    sel = select_served(held, val)
    assert sel["served"] == "c"  # 'a' is excellent on s1 but nearly blind on s2; 'c' is best in the worst case
    assert sel["summary"]["a"]["worst_set"] == "s2"
    assert len(sel["table"]) == 6 and "worst-case AUROC" in sel["reason"]
    none = select_served(held, {})
    assert none["served"] == "a" and "no OOD validation set" in none["reason"]


def test_version_1_calibration_still_serves_combined(centres):
    rng = np.random.default_rng(9)
    cal = calibrate(clustered_codes(rng, 200, centres))
    v1 = {k: v for k, v in cal.items() if k not in ("detectors", "scores", "served", "selection", "drift")}
    v1["version"] = 1
    suite = ScoreSuite.from_calibration(v1)
    assert suite.served == "combined" and suite.threshold == pytest.approx(cal["thresholds"]["combined"])


def test_a_served_name_the_calibration_lacks_is_refused(centres):
    rng = np.random.default_rng(10)
    cal = calibrate(clustered_codes(rng, 200, centres))
    with pytest.raises(CalibrationError, match="serves 'knn'"):
        ScoreSuite.from_calibration({**cal, "served": "knn"})
    with pytest.raises(CalibrationError, match="'served'"):
        ScoreSuite.from_calibration({k: v for k, v in cal.items() if k != "served"})


def test_scoring_cost_is_linear_and_finite_on_empty_codes(centres):
    """An all-zero code (possible for very sparse models) gets finite scores from every detector."""
    rng = np.random.default_rng(11)
    cal = calibrate(clustered_codes(rng, 300, centres), expected_l0=0.3)
    suite = ScoreSuite.from_calibration(cal)
    scores = suite.score_all(np.zeros((3, DIM), dtype=np.float32))
    assert all(np.all(np.isfinite(v)) for v in scores.values())
    assert set(scores) == set(cal["scores"]) and "l0_deviation" in scores
    assert math.isclose(float(scores["l0_deviation"][0]), 0.3)


def test_synthetic_shifts_are_deterministic_and_keep_the_image_shape():
    from PIL import Image

    from ood.shifts import SHIFT_NAMES, shifted_loaders

    class Source:
        name = "toy"

        def image(self, i: int):
            rng = np.random.default_rng(i)
            return Image.fromarray(rng.integers(0, 255, (28, 20), dtype=np.uint8), "L")

    for shift in SHIFT_NAMES:
        a = [load() for _, load in shifted_loaders(Source(), [0, 1], shift, seed=3)]
        b = [load() for _, load in shifted_loaders(Source(), [0, 1], shift, seed=3)]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
        assert a[0].mode == "L" and sorted(a[0].size) == [20, 28]
        assert not np.array_equal(np.asarray(a[0]), np.asarray(Source().image(0)))
    inverted = shifted_loaders(Source(), [0], "invert")[0][1]()
    np.testing.assert_array_equal(np.asarray(inverted), 255 - np.asarray(Source().image(0)))
    with pytest.raises(ValueError, match="unknown shift"):
        shifted_loaders(Source(), [0], "sepia")
