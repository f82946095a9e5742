"""Errors that the CLI reports as a one-line message and exit code 2 instead of a traceback."""

from __future__ import annotations


class CliError(Exception):
    """Raised by any stage for bad user input; `cli.main` prints it on one line and exits with code 2."""

    exit_code = 2
