"""Atomic file writing: a kill at any moment leaves the old file or the new one, never half.

Every file the project writes goes through these helpers (temp file in the same folder,
fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; give written files the usual permissions (0666 minus the umask).
# The umask is read once here, at import, because reading it means setting it (not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name is cut (to 100 bytes) so that the temp name stays within the usual 255-byte limit
    head = os.fsdecode(os.fsencode(path.name)[:100])
    fd, tmp = tempfile.mkstemp(prefix=f".{head}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fh.fileno(), _FILE_MODE)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_text(path: str | Path, what: str, *, missing: str = "file not found",
              encoding: str = "utf-8") -> str:
    """Read a text file the user named; a missing or unreadable file is a one-line
    :class:`~ptxseg.errors.DataError` (``missing`` / ``cannot read {what} (...)``)."""
    from ptxseg.errors import DataError

    try:
        return Path(path).read_text(encoding=encoding)
    except FileNotFoundError:
        raise DataError(path, missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read {what} ({exc})") from None


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV document (``\\n`` line ends) from a header and rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file atomically (see :func:`csv_text`)."""
    write_text(path, csv_text(header, rows))


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys are NOT used: key order is part of the layout)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_png(path: str | Path, array, *, fast: bool = False) -> None:
    """Write a uint8 (H, W) or (H, W, 3 BGR) array as PNG, atomically.

    ``fast``: zlib level 1 with the "Up" row filter instead of OpenCV's default (level 3,
    adaptive filters): radiographs encode about 2x faster into files of about the same size.
    """
    import cv2

    params: list[int] = []
    if fast:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:  # pragma: no cover - cv2 only fails on unsupported dtypes
        raise ValueError(f"{path}: could not encode PNG")
    write_bytes(path, buf.tobytes())


def save_figure(path: str | Path, fig, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=fmt, **kwargs)
