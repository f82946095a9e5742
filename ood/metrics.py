"""OOD detection metrics with out-of-distribution as the positive class, as OpenOOD reports them.

sklearn is not a dependency; these follow its definitions (roc_auc_score, average_precision_score, the first
ROC point at TPR >= 0.95) so numbers are comparable with published OOD tables.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata


def _pair(id_scores: Any, ood_scores: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    a = np.asarray(id_scores, dtype=np.float64).ravel()
    b = np.asarray(ood_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("OOD metrics need at least one in-distribution and one out-of-distribution score")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("OOD scores must be finite")
    return a, b


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """P(OOD score > ID score) + P(tie) / 2, from mid-ranks (the Mann-Whitney U statistic over n_id * n_ood)."""
    a, b = _pair(id_scores, ood_scores)
    ranks = rankdata(np.concatenate([a, b]))
    u = float(np.sum(ranks[a.size :])) - b.size * (b.size + 1) / 2.0
    return u / (a.size * b.size)


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> float:
    """Fraction of ID inputs flagged at the strictest threshold that still flags `tpr` of the OOD inputs.

    That threshold is the ceil(tpr * n_ood)-th largest OOD score, which is where sklearn's roc_curve first
    reaches TPR >= tpr.
    """
    a, b = _pair(id_scores, ood_scores)
    k = max(1, math.ceil(tpr * b.size - 1e-12))
    threshold = np.sort(b)[::-1][k - 1]
    return float(np.mean(a >= threshold))


def average_precision(id_scores: Any, ood_scores: Any, *, positive: str = "ood") -> float:
    """Step-wise area under the precision-recall curve: sum over distinct thresholds of dRecall * Precision.

    positive='ood' is AUPR-Out (OOD positive, higher score = positive); 'id' is AUPR-In (ID positive, lower
    score = positive), as OpenOOD reports both.
    """
    a, b = _pair(id_scores, ood_scores)
    if positive == "ood":
        scores = np.concatenate([b, a])
    elif positive == "id":
        scores = -np.concatenate([a, b])
        a, b = b, a
    else:
        raise ValueError(f"positive must be 'ood' or 'id', not {positive!r}")
    labels = np.concatenate([np.ones(b.size), np.zeros(a.size)])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each group of tied scores
    tp = np.cumsum(y)[last_of_run]
    predicted = last_of_run + 1.0
    precision = tp / predicted
    recall = tp / b.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_metrics(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> dict[str, float]:
    """The OpenOOD set: AUROC, FPR@tpr, AUPR-Out (OOD positive, reported as 'aupr') and AUPR-In."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, tpr),
        "aupr": average_precision(id_scores, ood_scores, positive="ood"),
        "aupr_in": average_precision(id_scores, ood_scores, positive="id"),
    }
