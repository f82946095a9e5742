"""Offline probes against independent references: a brute-force numpy kNN and scipy's L-BFGS-B on a numpy
softmax regression, plus behaviour on separable data (~100%) and on random labels (chance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, special

from pretrain.evaluate.probes import KNN_TEMPERATURE, knn_accuracy, knn_predict, linear_probe, standardize


def _knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """One test point at a time, the textbook way: cosine similarities, k largest, exp(s/T) votes."""
    tr = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    te = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    preds = []
    for row in te:
        sims = tr @ row
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in order:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize(("k", "chunk"), [(1, 1024), (5, 7), (20, 16), (500, 64)])
def test_knn_matches_brute_force_loop(k, chunk):
    rng = np.random.default_rng(k)
    num_classes = 4
    train_x = rng.normal(size=(150, 12))
    train_y = rng.integers(0, num_classes, size=150)
    # class-dependent means so that votes are not all ties of noise
    train_x[np.arange(150), train_y] += 1.5
    test_x = rng.normal(size=(60, 12))
    ref = _knn_reference(train_x, train_y, test_x, min(k, 150), KNN_TEMPERATURE, num_classes)
    got = knn_predict(
        torch.tensor(train_x, dtype=torch.float32),
        torch.tensor(train_y),
        torch.tensor(test_x, dtype=torch.float32),
        k=k,
        num_classes=num_classes,
        chunk_size=chunk,
    )
    np.testing.assert_array_equal(got.numpy(), ref)


def test_knn_temperature_changes_the_vote():
    """One very close neighbour of class 0 against two farther ones of class 1: a low temperature lets the
    closest win, a high one turns the vote into a plain majority."""
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_y = torch.tensor([0, 1, 1])
    test_x = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=0.07).item() == 0
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=100.0).item() == 1


def test_knn_accuracy_on_clusters_and_zero_rows():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 5
    y = rng.integers(0, 5, size=400)
    x = torch.tensor(centres[y] + rng.normal(size=(400, 16)) * 0.3, dtype=torch.float32)
    yt = torch.tensor(y)
    assert knn_accuracy(x[:300], yt[:300], x[300:], yt[300:]) == 1.0
    # an all-zero test row (a fully silent rectified code) is similar to nothing but still gets a prediction
    pred = knn_predict(x[:300], yt[:300], torch.zeros(1, 16), k=20)
    assert pred.shape == (1,) and 0 <= int(pred) < 5


def _softmax_regression_reference(x, y, num_classes, weight_decay):
    """Same objective in numpy, minimised by scipy's L-BFGS-B to a tight tolerance."""
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def fun(theta):
        w, b = theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes :]
        logits = x @ w + b
        lse = special.logsumexp(logits, axis=1)
        loss = np.mean(lse - logits[np.arange(n), y]) + 0.5 * weight_decay * np.sum(w * w)
        p = np.exp(logits - lse[:, None])
        gw = x.T @ (p - onehot) / n + weight_decay * w
        gb = (p - onehot).mean(0)
        return loss, np.concatenate([gw.ravel(), gb])

    res = optimize.minimize(
        fun,
        np.zeros(d * num_classes + num_classes),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-15},
    )
    return res.fun, res.x


def test_linear_probe_objective_matches_scipy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) * rng.uniform(0.1, 5, size=6) + rng.normal(size=6)
    y = (x @ rng.normal(size=(6, 3)) + rng.normal(size=(300, 3))).argmax(1)
    wd = 1e-2
    ours = linear_probe(torch.tensor(x), torch.tensor(y), torch.tensor(x), torch.tensor(y), weight_decay=wd)
    xs = (x - x.mean(0)) / x.std(0, ddof=1)  # the probe standardizes with the train statistics
    ref_loss, ref_theta = _softmax_regression_reference(xs, y, 3, wd)
    assert ours.loss == pytest.approx(ref_loss, rel=1e-7)
    w, b = ref_theta[:18].reshape(6, 3), ref_theta[18:]
    assert ours.train_accuracy == pytest.approx(np.mean((xs @ w + b).argmax(1) == y), abs=1 / 300 + 1e-12)
    assert ours.converged


def test_linear_probe_separable_data_reaches_full_accuracy():
    rng = np.random.default_rng(2)
    num_classes, dim = 5, 32
    protos = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=3000)
    x = protos[y] * 3 + rng.normal(size=(3000, dim)) * 0.5
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    res = linear_probe(xt[:2000], yt[:2000], xt[2000:], yt[2000:])
    assert res.accuracy >= 0.995
    assert res.train_accuracy >= 0.995


def test_linear_probe_random_labels_is_at_chance():
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(3000, 64)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, size=3000))
    res = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    sigma = np.sqrt(0.25 * 0.75 / 2000)
    assert abs(res.accuracy - 0.25) < 5 * sigma
    assert res.train_accuracy > res.accuracy + 0.1  # it does fit (memorise) the train labels


def test_standardize_uses_train_statistics_and_keeps_constant_columns_finite():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[2.0, 7.0]])
    tr, te = standardize(train, test)
    assert torch.isfinite(tr).all() and torch.isfinite(te).all()
    assert te[0, 0].item() == pytest.approx(0.0)
    assert te[0, 1].item() == pytest.approx(2.0)  # constant train column: shifted, not scaled


def test_probe_input_errors():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="2-D"):
        knn_predict(torch.randn(10), y, x)
    with pytest.raises(ValueError, match="one label per sample"):
        linear_probe(x, y[:5], x, y)
    with pytest.raises(ValueError, match="k must be positive"):
        knn_predict(x, y, x, k=0)
    with pytest.raises(ValueError, match="differ in dimension"):
        linear_probe(x, y, torch.randn(10, 4), y)
