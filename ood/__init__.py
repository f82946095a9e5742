"""Out-of-distribution scoring: activation statistics, multi-dimension detectors, and the score chosen to serve.

`ood.suite.ScoreSuite` is what the HTTP server imports; heavy pieces (the ONNX runtime, faiss) load only where used.
"""

from ood.calibration import calibrate, calibrate_model
from ood.schema import CalibrationError
from ood.scores import OODScorer

__all__ = ["CalibrationError", "OODScorer", "calibrate", "calibrate_model"]
