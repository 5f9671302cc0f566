"""Typed errors. Library code raises these; only ``cli.py`` turns them into a one-line
red message and exit code 2.

Messages name the file (or key) first and then the problem, e.g.
``"data/png_images/3.png: not a readable image (truncated PNG)"``.
"""

from __future__ import annotations

from pathlib import Path


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
