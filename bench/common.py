"""What the bench scripts share: the repository on sys.path, one argument-parser style, Markdown tables, results
sections that a script replaces without touching the rest of a page, and the wait for a `lpjepa serve` process.

Importing this module puts the repository root first on sys.path, so `python bench/x.py` imports the product's
packages from this checkout without an install (bench/ itself is on the path as the script's own folder).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.atomic_io import atomic_write_text  # noqa: E402


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The script's whole docstring as --help, line breaks kept (the usage examples are in it)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row (cells already formatted). `align` holds
    one letter per column, ``r`` for right-aligned (numbers); without it the rule is plain ``|---|``."""
    rule = (
        "|" + "---|" * len(header)
        if not align
        else "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    )
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_section(path: Path, block: str, begin: str, end: str, *, new_page: str | None = None) -> None:
    """Replace the part of `path` from `begin` to `end` with `block` (which starts with `begin` and ends with
    `end`), keeping whatever else the page holds (notes by hand, other benchmarks' sections) one blank line
    away. Without that part the block goes first, or, with `new_page` (the heading of a page that does not exist
    yet), last."""
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
    elif new_page is None:
        head, tail = "", old.lstrip("\n")
    else:
        head, tail = (old.rstrip() + "\n\n" if old else new_page), ""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, head + block.rstrip("\n") + "\n" + ("\n" + tail if tail else ""))


def section_of(path: Path, begin: str, end: str) -> str:
    """The part of `path` from `begin` to `end` (markers included), or "" when the page has none."""
    old = path.read_text() if path.is_file() else ""
    if begin in old and end in old:
        return begin + old.split(begin, 1)[1].split(end, 1)[0] + end
    return ""


def wait_for_server(proc: subprocess.Popen, timeout: float, what: str = "server") -> str:
    """The URL of a `lpjepa serve --port 0` process once it listens and /readyz answers 200 (read from its
    stdout); the process is killed and RuntimeError raised when it exits first or `timeout` seconds pass."""
    import httpx

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:  # stdout closed: the process is exiting
            break
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            continue
        url = match.group(1)
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not become ready (exit code {proc.wait()})")
