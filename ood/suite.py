"""Every OOD score of a calibration behind one object, and the one it serves.

A calibration (version 2) holds the activation statistics of scores.py, the fitted detectors of detectors.py, a
threshold per score (split-conformal on held-out in-distribution data), and `served`: the score chosen by the
evidence in `selection` (see selection.py). The server, `lpjepa ood score` and `ood eval` all go through
`ScoreSuite`, so the flag a response carries is the served score's and says which score that is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ood.detectors import Inputs, detector_from_state
from ood.schema import CalibrationError, CalibrationV2, parse_calibration
from ood.scores import SCORE_NAMES, OODScorer, OODScores

# What each score needs at scoring time (the point of the activation scores: no index, no D x D matrix).
NEEDS = {
    "rate": "calibration (l0 distribution)",
    "pattern": "calibration (D rates)",
    "combined": "calibration",
    "l0_deviation": "analytic E[l0] only",
    "pattern_mixture": "K x D cluster rates (activation pattern)",
    "pattern_lowrank": "D x r components (activation pattern)",
    "code_lowrank": "D x r components (code values)",
    "code_mahalanobis": "D x D whitening matrix (code values)",
    "feature_mahalanobis": "F x F whitening matrix (encoder features)",
    "knn": "index of ID train embeddings",
    "mahalanobis": "D x D precision matrix",
}
# Scores computed from the firing pattern alone: no index, no D x D matrix over a dense embedding.
ACTIVATION_STATISTICS = ("rate", "pattern", "combined", "l0_deviation", "pattern_mixture", "pattern_lowrank")


@dataclass
class ServedScores(OODScores):
    """Per-input result of the served score (`score`, `is_ood`) plus the activation scores every response reports."""

    score_name: str
    threshold: float

    def to_records(self) -> list[dict[str, Any]]:
        """As OODScores', with score and is_ood first and the served score's name and threshold last."""
        named = {"score_name": self.score_name, "threshold": self.threshold}
        return [{"score": r["score"], "is_ood": r["is_ood"], **r} | named for r in super().to_records()]


class ScoreSuite:
    """All scores of one calibration; `score` returns the served one, `score_all` every one (for evaluation)."""

    def __init__(
        self,
        activation: OODScorer,
        detectors: dict[str, Any],
        thresholds: dict[str, float],
        served: str,
        *,
        expected_l0: float | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.activation = activation
        self.detectors = dict(detectors)
        self.expected_l0 = None if expected_l0 is None else float(expected_l0)
        self.thresholds = {k: float(v) for k, v in thresholds.items()}
        self.calibration = calibration
        if served not in self.names:
            raise CalibrationError(f"calibration serves {served!r}, which it does not define ({', '.join(self.names)})")
        if served not in self.thresholds:
            raise CalibrationError(f"calibration has no threshold for the served score {served!r}")
        self.served = served

    @property
    def names(self) -> list[str]:
        out = list(SCORE_NAMES)
        if self.expected_l0 is not None:
            out.append("l0_deviation")
        return out + list(self.detectors)

    @property
    def dim(self) -> int:
        return self.activation.dim

    @property
    def score_name(self) -> str:
        return self.served

    @property
    def threshold(self) -> float:
        return self.thresholds[self.served]

    @property
    def tpr(self) -> float | None:
        return self.activation.tpr

    def needs_features(self, name: str | None = None) -> bool:
        det = self.detectors.get(self.served if name is None else name)
        return det is not None and det.input_name == "features"

    def _inputs(self, codes: Any, features: Any = None) -> Inputs:
        inputs = codes if isinstance(codes, Inputs) else Inputs.from_arrays(codes, features)
        if inputs.active.shape[1] != self.dim:
            raise ValueError(f"embeddings have {inputs.active.shape[1]} dimensions; the calibration has {self.dim}")
        return inputs

    def score_named(self, name: str, inputs: Inputs) -> NDArray[np.float64]:
        if name in SCORE_NAMES:
            return self.activation.score(inputs.active).by_name(name)
        if name == "l0_deviation":
            if self.expected_l0 is None:
                raise ValueError("l0_deviation needs the model's analytic E[l0]")
            return np.abs(np.diff(inputs.active.indptr) / self.dim - self.expected_l0)
        if name not in self.detectors:
            raise KeyError(f"no score named {name!r}; this calibration has {', '.join(self.names)}")
        return self.detectors[name].score(inputs)

    def score_all(self, codes: Any, features: Any = None) -> dict[str, NDArray[np.float64]]:
        """Every score this calibration defines (those needing features only when features are given)."""
        inputs = self._inputs(codes, features)
        act = self.activation.score(inputs.active)
        out = {name: act.by_name(name) for name in SCORE_NAMES}
        for name in self.names[len(SCORE_NAMES) :]:
            if self.needs_features(name) and inputs.features is None:
                continue
            out[name] = self.score_named(name, inputs)
        return out

    def score(self, codes: Any, features: Any = None) -> ServedScores:
        """The served score, its flag and the activation scores; features are required when the served score
        needs them (the server then runs the model's feature output)."""
        inputs = self._inputs(codes, features)
        act = self.activation.score(inputs.active)
        served = act.by_name(self.served) if self.served in SCORE_NAMES else self.score_named(self.served, inputs)
        return ServedScores(
            score=served,
            is_ood=served > self.threshold,
            l0=act.l0,
            rate_score=act.rate_score,
            pattern_score=act.pattern_score,
            score_name=self.served,
            threshold=self.threshold,
        )

    @classmethod
    def from_calibration(cls, cal: dict[str, Any]) -> ScoreSuite:
        """Version 1 calibrations (activation scores only) serve `combined`, as they did when written."""
        parsed = parse_calibration(cal)
        activation = OODScorer.from_model(parsed, cal)
        if not isinstance(parsed, CalibrationV2):
            return cls(activation, {}, dict(activation.thresholds), "combined", calibration=cal)
        return cls(
            activation,
            {name: detector_from_state(state) for name, state in parsed.detectors.items()},
            {name: entry.threshold for name, entry in parsed.scores.items()},
            parsed.served,
            expected_l0=parsed.l0.expected,
            calibration=cal,
        )
