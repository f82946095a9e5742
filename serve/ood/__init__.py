"""Out-of-distribution scoring from activation statistics: cheap (no index, no labels) and calibrated.

`OODScorer` is what the HTTP server imports; heavy pieces (the ONNX runtime, faiss) load only where used.
"""

from serve.ood.calibration import calibrate, calibrate_model
from serve.ood.scores import CALIBRATION_VERSION, CalibrationError, OODScorer, OODScores

__all__ = ["CALIBRATION_VERSION", "CalibrationError", "OODScorer", "OODScores", "calibrate", "calibrate_model"]
