"""Which score to serve, decided by measurement on validation data rather than by name.

Every score is evaluated on the held-out in-distribution part of the calibration against each OOD validation set
(the sets the user names and the synthetic shifts `lpjepa ood calibrate` makes). The served score is the one
with the highest *worst-case* AUROC over the validation sets, ties (within 0.005) broken by the lower mean
FPR@95: a detector that is excellent on one shift and blind to another is the failure a user cannot see, so the
worst set decides. Without any validation set there is no evidence, and the default is stated as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ood.metrics import ood_metrics

RULE = "max over scores of min AUROC over the validation sets; ties within 0.005 -> lower mean FPR@95"
TIE = 0.005
# Without validation data: the literature's strongest single detector among those this calibration has.
DEFAULT_ORDER = ("feature_mahalanobis", "code_mahalanobis", "pattern_mixture", "combined")


def select_served(
    held_scores: dict[str, Any], validation_scores: dict[str, dict[str, Any]], *, tpr: float = 0.95
) -> dict[str, Any]:
    """The `selection` section of a calibration: table, rule, chosen name and a sentence saying why."""
    names = list(held_scores)
    table: list[dict[str, Any]] = []
    for set_name, scores in validation_scores.items():
        for name in (n for n in names if n in scores):
            m = ood_metrics(held_scores[name], scores[name], tpr)
            table.append({"score": name, "set": set_name, "n": int(np.size(scores[name])), **m})
    if not table:
        served = next(n for n in (*DEFAULT_ORDER, names[0]) if n in names)
        reason = f"no OOD validation set was given, so {served} is served by default (no evidence)"
        return {"served": served, "rule": RULE, "reason": reason, "validation_sets": [], "table": [], "summary": {}}
    sets = list(dict.fromkeys(row["set"] for row in table))
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        rows = [r for r in table if r["score"] == name]
        if len(rows) != len(sets):  # a score that could not be computed on some set is not a candidate
            continue
        aurocs = [r["auroc"] for r in rows]
        worst = min(rows, key=lambda r: r["auroc"])
        summary[name] = {
            "min_auroc": float(min(aurocs)),
            "mean_auroc": float(np.mean(aurocs)),
            "mean_fpr95": float(np.mean([r["fpr95"] for r in rows])),
            "worst_set": worst["set"],
        }
    best_min = max(s["min_auroc"] for s in summary.values())
    tied = [n for n, s in summary.items() if s["min_auroc"] >= best_min - TIE]
    served = min(tied, key=lambda n: (summary[n]["mean_fpr95"], -summary[n]["min_auroc"]))
    ranked = sorted(summary, key=lambda n: -summary[n]["min_auroc"])
    runner = next((n for n in ranked if n != served), None)
    s = summary[served]
    reason = (
        f"{served}: worst-case AUROC {s['min_auroc']:.3f} over {len(sets)} validation sets "
        f"(worst: {s['worst_set']}; mean AUROC {s['mean_auroc']:.3f}, mean FPR@95 {s['mean_fpr95']:.3f})"
    )
    if runner is not None:
        r = summary[runner]
        reason += f"; next best {runner} {r['min_auroc']:.3f} (worst: {r['worst_set']})"
    return dict(served=served, rule=RULE, reason=reason, validation_sets=sets, table=table, summary=summary)
