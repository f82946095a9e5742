"""Exceptions of the index stage.

All but one subclass ``core.errors.InvalidError`` (a ``ValueError``), so callers that only know "bad input" still
catch them; ``BackendUnavailableError`` is an ``UnavailableError`` (a ``ConnectionError``). The HTTP server maps
them to statuses in one handler, the CLI to a one-line message with exit code 2.
"""

from __future__ import annotations

from core.errors import InvalidError, UnavailableError


class IndexError_(InvalidError):  # noqa: N801 - trailing underscore: the builtin IndexError means something else
    """Base class: the request or the files on disk are wrong, not the program."""


class InvalidInputError(IndexError_):
    """Ids, vectors, payloads or parameters that the index cannot accept."""


class DimensionMismatchError(InvalidInputError):
    """Vectors whose width differs from the index dimension (usually a different model)."""


class UnknownIdError(InvalidInputError):
    """Ids that are not in the index; nothing was changed."""


class CorruptIndexError(IndexError_):
    """Index files that are missing, truncated or whose checksum does not match the manifest."""


class IndexMismatchError(IndexError_):
    """A well-formed index that is not what the caller expects (dimension, metric, backend, format version)."""


class BackendUnavailableError(UnavailableError):
    """The store behind the index (a Milvus server) cannot be reached or failed; the request may be retried.

    Not a ValueError: nothing is wrong with the request. The server answers 503 with Retry-After; the CLI prints one
    line and exits 2.
    """
