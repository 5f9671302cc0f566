"""Typed errors. Library code raises these; only ``cli.py`` turns them into a one-line
red message and exit code 2.

Messages name the file (or key) first and then the problem, e.g.
``"data/png_images/3.png: not a readable image (truncated PNG)"``.
"""

from __future__ import annotations

import re
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """``text`` with control characters (newlines, terminal escapes...) written as escapes
    (``\\n``, ``\\x1b``): file names and CSV cells quoted in a message can neither break
    it over several lines nor send commands to the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class PtxsegError(Exception):
    """A user mistake or bad input: reported as one line, exit code 2, no traceback."""


class DataError(PtxsegError):
    """A dataset file or folder that cannot be used (unreadable, wrong size, bad RLE ...)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ConfigError(PtxsegError):
    """A configuration key that is unknown, missing or of the wrong type."""


class CheckpointError(PtxsegError):
    """A checkpoint that is missing, truncated, unsafe or does not match the config."""


class RunDirError(PtxsegError):
    """A run folder that is missing files, or already exists when it should not."""
