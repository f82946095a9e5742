"""Errors of the export stage that callers (CLI, HTTP server, indexer) turn into clear messages, not tracebacks."""

from __future__ import annotations

from core.errors import InvalidError


class ModelLoadError(InvalidError):
    """A model file that is missing, unreadable, or not an lpjepa export; the message names the file."""


class ImageDecodeError(InvalidError):
    """An input image that cannot be decoded or converted; the message names its index in the request."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class ExportError(InvalidError):
    """An export that cannot proceed (bad precision/opset, missing data, unsupported model); the CLI exits 2."""


class ParityError(ExportError):
    """The exported model does not reproduce PyTorch within the stated tolerances; nothing was written."""

    def __init__(self, report: object, message: str) -> None:
        super().__init__(message)
        self.report = report


class MissingBackendError(ExportError):
    """An optional backend (TensorRT, a CUDA GPU) is not available on this machine; the message says which."""
