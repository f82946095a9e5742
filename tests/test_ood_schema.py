"""The calibration file's schema (ood/schema.py): what calibrate writes is what the schema reads back, key for key;
a version-1 file in the layout its writer used still loads; broken sections fail naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ood import CalibrationError, calibrate
from ood.detectors import Inputs
from ood.drift import DriftMonitor
from ood.schema import CalibrationV1, CalibrationV2, parse_calibration
from ood.suite import ScoreSuite

DIM = 24


@pytest.fixture(scope="module")
def cal():
    rng = np.random.default_rng(0)
    codes = np.maximum(rng.normal(-0.4, 1.0, (400, DIM)), 0).astype(np.float32)
    feats = rng.normal(size=(400, 6)).astype(np.float32)
    val = {"shifted": Inputs.from_arrays(np.maximum(rng.normal(0.2, 1.0, (100, DIM)), 0), rng.normal(size=(100, 6)))}
    out = calibrate(codes, features=feats, validation=val, expected_l0=0.3, source={"spec": "synthetic"}, rank=4)
    return json.loads(json.dumps(out))


def test_what_calibrate_writes_reads_back_unchanged(cal):
    parsed = parse_calibration(cal)
    assert isinstance(parsed, CalibrationV2)
    again = parsed.to_dict()
    assert again == cal and list(again) == list(cal)  # same keys, same order, same values
    assert list(again["drift"]["principal"]) == list(cal["drift"]["principal"])
    assert parsed.detectors["pattern_mixture"].rates.array.shape[1] == DIM


def test_version_1_layout_loads_and_serves_combined(cal):
    """The keys and order the version-1 writer produced (before detectors, selection and drift existed)."""
    v1_keys = ["version", "kind", "created", "dim", "tpr", "seed", "alpha", "n", "n_fit", "n_holdout", "rates", "l0"]
    v1_keys += ["dead_dims", "normalization", "thresholds", "holdout_tpr", "source"]
    v1 = {key: cal[key] for key in v1_keys} | {"version": 1}
    assert isinstance(parse_calibration(v1), CalibrationV1) and not isinstance(parse_calibration(v1), CalibrationV2)
    suite = ScoreSuite.from_calibration(v1)
    assert suite.served == "combined" and suite.threshold == cal["thresholds"]["combined"] and not suite.detectors
    assert DriftMonitor.from_calibration(v1) is None


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["drift"].update(l0_pmf=c["drift"]["l0_pmf"][:-1]), "drift.l0_pmf"),
        (lambda c: c["drift"].update(window=1), "drift.window"),
        (lambda c: c["drift"]["principal"]["components"].update(shape=[3, 5]), "drift.principal.components"),
        (lambda c: c["detectors"]["code_mahalanobis"].update(input="pixels"), "detectors.code_mahalanobis.input"),
        (lambda c: c["detectors"]["code_lowrank"].update(eigvals=[1.0]), "detectors.code_lowrank"),
        (lambda c: c["scores"]["rate"].update(threshold="high"), "scores.rate.threshold"),
        (lambda c: c.update(tpr=1.5), "tpr"),
    ],
)
def test_broken_sections_name_their_field(cal, mutate, field):
    bad = json.loads(json.dumps(cal))
    mutate(bad)
    with pytest.raises(CalibrationError, match=field.replace(".", r"\.")):
        ScoreSuite.from_calibration(bad)


def test_a_detector_of_another_dimension_is_refused(cal):
    bad = json.loads(json.dumps(cal))
    other = calibrate(np.maximum(np.random.default_rng(1).normal(-0.4, 1.0, (100, DIM + 1)), 0), rank=4)
    bad["detectors"]["pattern_mixture"] = other["detectors"]["pattern_mixture"]
    with pytest.raises(CalibrationError, match=f"'detectors.pattern_mixture' has {DIM + 1} dimensions"):
        ScoreSuite.from_calibration(bad)
