"""An argparse parser whose errors are one line and exit code 2, so scripts can tell bad input from a crash."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; users asked for a single line naming the problem."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)
