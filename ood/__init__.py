"""Out-of-distribution scoring: activation statistics, multi-dimension detectors, and the score chosen to serve.

`ScoreSuite` is what the HTTP server imports; heavy pieces (the ONNX runtime, faiss) load only where used.
"""

from ood.calibration import calibrate, calibrate_model
from ood.schema import CALIBRATION_VERSION, CalibrationError
from ood.scores import OODScorer, OODScores
from ood.suite import ScoreSuite, ServedScores

__all__ = [
    "CALIBRATION_VERSION",
    "CalibrationError",
    "OODScorer",
    "OODScores",
    "ScoreSuite",
    "ServedScores",
    "calibrate",
    "calibrate_model",
]
