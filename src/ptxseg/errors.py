"""Typed errors. Library code raises these; only ``cli.py`` turns them into a one-line
red message and exit code 2.

Messages name the file (or key) first and then the problem, e.g.
``"data/png_images/3.png: not a readable image (truncated PNG)"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def printable(name: str | os.PathLike) -> str:
    """A file or folder name as text: bytes that are not UTF-8 (which Python keeps in ``str``
    as lone surrogates, ``\\udcff`` for the byte ``0xff``) are written ``\\xff``.

    The one rule for such names: messages, CSV cells and other text outputs show them so (a
    name that is not UTF-8 cannot be written into a UTF-8 file as is), and dataset ids made
    from them carry the same escape (``predict``'s file-safe ids turn the ``\\`` into ``_``).
    """
    return _SURROGATE.sub(_escape_surrogate, os.fspath(name))


def one_line(text: str) -> str:
    """``text`` with control characters (newlines, terminal escapes...) written as escapes
    (``\\n``, ``\\x1b``) and bytes that are not UTF-8 as ``\\xff`` (:func:`printable`):
    file names and CSV cells quoted in a message can neither break it over several lines nor
    send commands to the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], printable(text))


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


class ModelOutputError(PtxsegError):
    """The model gave an output nothing can be made of (a NaN or infinite probability): a
    fault of the model or the machine, not of the input (the service answers 500)."""
