"""OOD metrics and baselines against independent references: scipy, brute-force loops, closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse, stats
from scipy.spatial.distance import mahalanobis

from ood import calibrate
from ood.baselines import KNNDistance, l0_deviation
from ood.detectors import GaussianMahalanobis, Inputs, ledoit_wolf
from ood.evaluate import batch_l0_shift, evaluate_embeddings, train_spec_for
from ood.metrics import auroc, average_precision, fpr_at_tpr, ood_metrics
from ood.scores import SCORE_NAMES as OUR_METHODS


def brute_auroc(a: np.ndarray, b: np.ndarray) -> float:
    wins = sum((y > x) + 0.5 * (y == x) for x in a for y in b)
    return wins / (a.size * b.size)


def brute_fpr(a: np.ndarray, b: np.ndarray, tpr: float) -> float:
    """Walk thresholds from the top; the first with OOD recall >= tpr gives the reported FPR."""
    for t in np.sort(np.unique(np.r_[a, b]))[::-1]:
        if np.mean(b >= t) >= tpr:
            return float(np.mean(a >= t))
    raise AssertionError("unreachable")


def brute_ap(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mean over positives of the precision at the threshold equal to that positive's score."""
    allv = np.r_[neg, pos]
    return float(np.mean([np.sum(pos >= s) / np.sum(allv >= s) for s in pos]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_references_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 12, size=70).astype(float)  # integer scores: many ties
    b = rng.integers(3, 15, size=45).astype(float)
    u = stats.mannwhitneyu(b, a, alternative="two-sided").statistic
    assert auroc(a, b) == pytest.approx(u / (a.size * b.size), abs=1e-12)
    assert auroc(a, b) == pytest.approx(brute_auroc(a, b), abs=1e-12)
    assert fpr_at_tpr(a, b, 0.95) == pytest.approx(brute_fpr(a, b, 0.95), abs=1e-12)
    assert fpr_at_tpr(a, b, 0.5) == pytest.approx(brute_fpr(a, b, 0.5), abs=1e-12)
    assert average_precision(a, b) == pytest.approx(brute_ap(a, b), abs=1e-12)
    # AUPR-In: ID is the positive class and lower scores are more ID.
    assert average_precision(a, b, positive="id") == pytest.approx(brute_ap(-b, -a), abs=1e-12)


def test_metrics_extremes_and_continuous_scores():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=300), rng.normal(size=200) + 10
    m = ood_metrics(a, b)
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr": 1.0, "aupr_in": 1.0}
    assert auroc(b, a) == 0.0 and fpr_at_tpr(b, a) == 1.0
    # Gaussian shift d: AUROC = Phi(d / sqrt 2); AUPR of an uninformative score ~ the OOD prevalence.
    a, b = rng.normal(size=4000), rng.normal(1.0, 1.0, size=4000)
    assert auroc(a, b) == pytest.approx(stats.norm.cdf(1 / np.sqrt(2)), abs=0.015)
    assert average_precision(rng.normal(size=4000), rng.normal(size=1000)) == pytest.approx(0.2, abs=0.03)
    with pytest.raises(ValueError, match="finite"):
        auroc([0.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])


def test_knn_matches_brute_force_cosine():
    rng = np.random.default_rng(4)
    train = np.maximum(rng.normal(-0.5, 1, size=(300, 16)), 0).astype(np.float32)
    train[0] = 0.0  # an all-zero code must not produce NaN
    query = np.maximum(rng.normal(-0.5, 1, size=(40, 16)), 0).astype(np.float32)
    query[1] = 0.0
    knn = KNNDistance(k=50).fit(sparse.csr_matrix(train))
    got = knn.score(query)

    def unit(x):
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(n > 0, x / np.where(n > 0, n, 1), 0)

    sims = unit(query.astype(np.float64)) @ unit(train.astype(np.float64)).T
    want = -np.sort(sims, axis=1)[:, -50]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[1] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 50"):
        KNNDistance(k=50).fit(train[:10])


def test_ledoit_wolf_matches_the_papers_formula():
    """Ledoit & Wolf (2004), Lemma 3.2-3.4 written out as loops over samples."""
    rng = np.random.default_rng(5)
    x = rng.multivariate_normal(np.zeros(6), np.diag([5, 1, 1, 0.5, 0.2, 0.1]), size=40)
    mean, cov, shrink = ledoit_wolf(x)
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = sum(np.outer(r, r) for r in xc) / n
    m = np.trace(s) / p
    d2 = np.sum((s - m * np.eye(p)) ** 2) / p
    b2 = min(sum(np.sum((np.outer(r, r) - s) ** 2) / p for r in xc) / n**2, d2)
    assert shrink == pytest.approx(b2 / d2, rel=1e-10)
    np.testing.assert_allclose(cov, (b2 / d2) * m * np.eye(p) + (1 - b2 / d2) * s, rtol=1e-10)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    # Isotropic data needs no correlation structure: shrinkage goes to (nearly) all the way.
    _, _, iso = ledoit_wolf(rng.normal(size=(30, 20)))
    assert iso > 0.8


def test_mahalanobis_matches_scipy_and_survives_dead_dimensions():
    rng = np.random.default_rng(6)
    train = np.maximum(rng.normal(0.2, 1, size=(500, 8)), 0).astype(np.float32)  # embeddings are float32
    train[:, 3] = 0.0  # a dimension that never fires: singular sample covariance
    model = GaussianMahalanobis.fit(train, input_name="codes")
    q = np.maximum(rng.normal(0.2, 1, size=(10, 8)), 0).astype(np.float32)
    _, cov, _ = ledoit_wolf(train)
    cov = cov + 1e-9 * np.trace(cov) / 8 * np.eye(8)
    vi = np.linalg.inv(cov)
    want = [mahalanobis(r, train.astype(np.float64).mean(axis=0), vi) ** 2 for r in q.astype(np.float64)]
    np.testing.assert_allclose(model.score(Inputs.from_arrays(q)), want, rtol=1e-8)
    assert np.all(np.isfinite(model.score(Inputs.from_arrays(np.full((1, 8), 3.0)))))


def test_l0_deviation():
    np.testing.assert_allclose(l0_deviation([0.1, 0.5, 0.7], 0.5), [0.4, 0.0, 0.2])


def test_evaluate_embeddings_report_fields_and_values():
    rng = np.random.default_rng(7)
    mus = rng.normal(-1, 0.5, 64)

    def gen(n, shift=0.0):
        return sparse.csr_matrix(np.maximum(rng.laplace(mus + shift, 0.7, size=(n, 64)), 0).astype(np.float32))

    train, id_eval, ood = gen(800), gen(300), gen(200, shift=0.8)
    cal = calibrate(train)
    res = evaluate_embeddings(id_eval, ood, train, calibration=cal, expected_l0=0.25, k=50)
    rep = json.loads(json.dumps(res.report))
    assert set(rep["methods"]) == {*OUR_METHODS, *cal["scores"], "knn", "mahalanobis", "l0_deviation"}
    assert rep["served"] == cal["served"] and rep["methods"][cal["served"]]["served"] is True
    assert sum(m["served"] for m in rep["methods"].values()) == 1
    assert rep["methods"]["pattern_mixture"]["activation_statistics"] is True
    assert rep["methods"]["code_mahalanobis"]["activation_statistics"] is False
    for entry in rep["methods"].values():
        assert {"auroc", "fpr95", "aupr", "aupr_in", "score_us", "fit_s", "needs"} <= set(entry)
        assert 0.0 <= entry["auroc"] <= 1.0 and 0.0 <= entry["fpr95"] <= 1.0
    assert rep["methods"]["combined"]["auroc"] == pytest.approx(
        auroc(res.scores_id["combined"], res.scores_ood["combined"])
    )
    assert rep["methods"]["rate"]["auroc"] > 0.95
    assert rep["methods"]["knn"]["k"] == 50
    assert rep["l0"]["expected"] == 0.25 and rep["l0"]["ood_mean"] > rep["l0"]["id_mean"]
    assert 0.9 <= rep["operating_point"]["id_tpr"] <= 1.0
    assert res.l0_id.shape == (300,) and res.l0_ood.shape == (200,)
    assert set(rep["batch_l0_auroc"]) == {"16", "64", "256"}
    assert rep["batch_l0_auroc"]["256"] >= rep["methods"]["rate"]["auroc"] - 1e-9


def test_batch_shift_sees_what_a_per_input_test_cannot():
    """OOD rates slightly off-centre but narrower than ID (what the dev models show on MNIST): each input sits inside
    the ID band, so per-input AUROC is below 0.5, yet batch means separate."""
    rng = np.random.default_rng(8)
    l0_id, l0_ood = rng.normal(0.50, 0.07, 5000), rng.normal(0.515, 0.03, 5000)
    per_input = auroc(np.abs(l0_id - 0.5), np.abs(l0_ood - 0.5))
    batches = batch_l0_shift(l0_id, l0_ood, 0.5)
    assert per_input < 0.5
    assert batches["16"] < batches["64"] < batches["256"] and batches["256"] > 0.9


def test_train_split_for_id_specs(tmp_path):
    assert train_spec_for("fashion-mnist:test") == "fashion-mnist:train"
    assert train_spec_for("cifar10:test@/data/c10") == "cifar10:train@/data/c10"
    assert train_spec_for("imagenet100:val@/data/in100") == "imagenet100:train@/data/in100"
    assert train_spec_for("mnist") is None
    assert train_spec_for("fashion-mnist") is None
    assert train_spec_for(str(tmp_path)) is None
