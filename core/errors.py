"""The product's error base: every stage's errors subclass `LpjepaError`, so each front end maps them in one place.

The domain code says *what* went wrong (a class per kind of failure, a message naming the file, field or input);
it never decides how a front end reports it. The HTTP server turns these classes into statuses in one exception
handler (serve/errors.py) and the CLI into a one-line message and an exit code (cli/errors.py).

Two families below the base, because callers outside the product already catch the builtin kinds:
`InvalidError` is also a ValueError (the input, a file on disk or the requested state is wrong: retrying the same
thing cannot help) and `UnavailableError` is also a ConnectionError (a service is down or overloaded: a retry may
succeed). Keeping them apart matters: an `except ValueError` must never turn an outage into a 4xx.
"""

from __future__ import annotations

from typing import Any


class LpjepaError(Exception):
    """Base of every error the product raises on purpose; anything else reaching a front end is a bug."""


class InvalidError(LpjepaError, ValueError):
    """The input, a file on disk, or the requested state is wrong, not the program."""


class RejectedInput(InvalidError):
    """Input refused for a reason a client branches on: `code` names it (a class default, or per raise), and the
    front end maps the reason, not the class, to its status (serve/errors.REASON_STATUS)."""

    code = "invalid_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code


class UnavailableError(LpjepaError, ConnectionError):
    """A service the request needs (a Milvus server) cannot be reached or failed; the request may be retried."""


def first_error(err: Any) -> tuple[str, str]:
    """(dotted location, message) of a pydantic ValidationError's first problem, for a one-line error naming the
    field; duck-typed so that core imports no pydantic."""
    first = err.errors(include_url=False)[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"]
