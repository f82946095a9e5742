"""How the CLI reports the product's errors: one line naming the problem and an exit code, never a traceback.

Every stage raises its own `core.errors.LpjepaError` subclasses; `cli.main` catches the base once and asks
`exit_code` here, so the mapping from kinds of failure to exit codes lives in one table.
"""

from __future__ import annotations

from core.errors import InvalidError, LpjepaError


class CliError(InvalidError):
    """Bad command-line input found by a stage's command (a flag combination, a missing file the user named)."""


# Every product error and a file the user named that cannot be read or written (OSError) exit with 2, argparse's own
# code for a usage error: the user must change the command.
EXIT_CODES: dict[type[BaseException], int] = {LpjepaError: 2, OSError: 2}
INTERRUPTED = 130


def exit_code(err: BaseException) -> int | None:
    """The exit code for an error the CLI reports as one line, or None for a bug (which keeps its traceback)."""
    return next((code for kind, code in EXIT_CODES.items() if isinstance(err, kind)), None)
