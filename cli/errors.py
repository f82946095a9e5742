"""How the CLI reports the product's errors: one line naming the problem and an exit code, never a traceback.

Every stage raises its own `core.errors.LpjepaError` subclasses; `cli.main` catches the base once and asks
`exit_code` here, so the mapping from kinds of failure to exit codes lives in one table.
"""

from __future__ import annotations

from core.errors import InvalidError, LpjepaError, UnavailableError


class CliError(InvalidError):
    """Bad command-line input found by a stage's command (a flag combination, a missing file the user named)."""


# First match wins (most specific first). 2 is argparse's own code for a usage error: the user must change the command.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UnavailableError, 2),
    (InvalidError, 2),
    (LpjepaError, 2),
    (OSError, 2),  # a file the user named cannot be read or written
)
INTERRUPTED = 130


def exit_code(err: BaseException) -> int | None:
    """The exit code for an error the CLI reports as one line, or None for a bug (which keeps its traceback)."""
    for kind, code in EXIT_CODES:
        if isinstance(err, kind):
            return code
    return None
