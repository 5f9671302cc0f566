"""Atomic file writing: a kill at any moment leaves the old file or the new one, never half.

Every file the project writes goes through these helpers (temp file in the same folder,
fsync, ``os.replace``). Text is written as UTF-8; a name that is not UTF-8 (a lone surrogate
in a ``str``) is written ``\\xff`` (:func:`ptxseg.errors.printable`) instead of failing.

Reading: :func:`open_regular` opens regular files only (a FIFO, a device, a symlink loop is
a one-line :class:`~ptxseg.errors.DataError`, never a read that blocks forever); every file
ptxseg reads goes through it (``tests/test_reliability_readers.py`` scans the code for any other
reader). A file parsed whole is read with a size limit (:func:`read_bytes`, :func:`read_text`:
:data:`TEXT_LIMIT`; :func:`read_json`: :data:`JSON_LIMIT` and :data:`JSON_DEPTH` levels of
nesting), checked on the file's size before reading and again while reading, so a huge file
is refused at once and a growing one after ``limit`` bytes.
:func:`folder_lock` keeps two processes from writing into one output folder at once.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# mkstemp creates 0600 files; give written files the usual permissions (0666 minus the umask).
# The umask is read once here, at import, because reading it means setting it (not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_PRINTABLE = "ptxseg.printable"


def _printable_errors(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler of text writes: a lone surrogate (a name byte that is not UTF-8)
    becomes its ``\\xff`` escape, as in messages."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    from ptxseg.errors import printable

    return printable(exc.object[exc.start : exc.end]), exc.end


codecs.register_error(_PRINTABLE, _printable_errors)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An ``OSError`` here (disk full, a folder in the way...) names ``path``, the user's file,
    not the hidden temporary file it is written through."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write ({exc.strerror or exc})", str(path)) from None


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if "b" not in mode:
        kwargs.setdefault("errors", _PRINTABLE)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name is cut (to 100 bytes) so that the temp name stays within the usual 255-byte limit
    head = os.fsdecode(os.fsencode(path.name)[:100])
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{head}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fh.fileno(), _FILE_MODE)
            yield fh
            with _naming(path):
                fh.flush()
                os.fsync(fh.fileno())
        with _naming(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(folder: str | Path) -> None:
    """Make the renames and removals in ``folder`` durable (a no-op where folders cannot be
    opened, Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def not_regular(path: str | Path) -> str | None:
    """``None`` for a regular file (symlinks followed), else what ``path`` is instead:
    ``"a FIFO"``, ``"a socket"``, ``"a device"``, ``"a folder"``, ``"a symlink loop"``,
    ``"a broken symlink"``, ``"missing"``... Only ``stat`` is called: nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return f"not accessible ({exc.strerror})"
    except ValueError:  # an embedded NUL
        return "not a valid file name"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "not a regular file"


def irregular_problem(kind: str) -> str:
    """The problem text for what :func:`not_regular` found (``"missing"`` -> not found)."""
    if kind == "missing":
        return "file not found"
    if kind in ("a symlink loop", "a broken symlink"):
        return kind.removeprefix("a ")
    return f"not a regular file ({kind})"


def open_regular(path: str | Path) -> IO[bytes]:
    """Open a regular file for binary reading; anything else is a :class:`DataError` naming
    ``path`` (``file not found``, ``symlink loop``, ``not a regular file (a FIFO)``...).

    ``stat`` is checked before opening, and the file is opened non-blocking and checked again
    on the open handle, so a FIFO swapped in between cannot block the read either.
    """
    from ptxseg.errors import DataError

    kind = not_regular(path)
    if kind is not None:
        raise DataError(path, irregular_problem(kind))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as exc:
        problem = "symlink loop" if exc.errno == errno.ELOOP else f"cannot read ({exc.strerror})"
        raise DataError(path, problem) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(path, irregular_problem(not_regular(path) or "not a regular file"))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def resolved(path: str | Path) -> Path:
    """The absolute path with symlinks resolved as far as they go (``os.path.realpath``):
    unlike ``Path.resolve`` it never raises, not even on a symlink loop."""
    return Path(os.path.realpath(path))


class FolderBusy(OSError):
    """The folder's lock is held by another process (``pid`` when it wrote one)."""

    def __init__(self, folder: Path, pid: int | None):
        self.folder, self.pid = folder, pid
        super().__init__(errno.EBUSY, "in use", str(folder))


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = ".ptxseg.lock") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/name`` (created; holds the holder's pid) for the
    block; the file is removed on exit. Raises :class:`FolderBusy` at once, without waiting,
    when another process holds it. A no-op where ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(folder) / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.read(fd, 32).decode("ascii", "replace").strip() or "x")
            except ValueError:
                pid = None
            os.close(fd)
            raise FolderBusy(Path(folder), pid) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have removed the file after we opened it: then our lock is
        # on a file nobody else sees, and we start again on the current one
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


#: the largest text file read whole (a CSV, a manifest): far above any real one
TEXT_LIMIT = 256 << 20
#: the largest JSON file read (thresholds.json, data.json, cv.json, predict.json)
JSON_LIMIT = 64 << 20
#: the deepest nesting of a JSON file read (ptxseg's own go 4 levels deep)
JSON_DEPTH = 32


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``"512 bytes"``, ``"1 MiB"``, ``"3.2 GiB"``."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
    raise AssertionError  # pragma: no cover


def read_bytes(path: str | Path, what: str, *, missing: str = "file not found",
               limit: int | None = TEXT_LIMIT) -> bytes:
    """Read a regular file the user named, whole (:func:`open_regular`).

    Args:
        what: what the file is, for messages (``"config"``, ``"CSV"``...).
        missing: the problem said of a missing file.
        limit: the most bytes it may hold (``None``: any size); a larger file is refused from
            its size before anything is read, a growing one after ``limit`` bytes.

    Raises:
        DataError: missing, not a regular file, unreadable, or larger than ``limit``.
    """
    from ptxseg.errors import DataError

    def too_large(size: str) -> DataError:
        return DataError(path, f"too large for a {what} ({size}; the limit is "
                               f"{size_text(limit or 0)})")  # fmt: skip

    try:
        with open_regular(path) as fh:
            if limit is None:
                return fh.read()
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise too_large(size_text(size))
            data = fh.read(limit + 1)
    except DataError as exc:
        if exc.problem == "file not found":
            raise DataError(path, missing) from None
        raise
    except OSError as exc:
        raise DataError(path, f"cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise too_large(f"more than {size_text(limit)}")
    return data


def read_text(path: str | Path, what: str, *, missing: str = "file not found",
              encoding: str = "utf-8", limit: int | None = TEXT_LIMIT) -> str:
    """Read a text file the user named (:func:`read_bytes`); a missing or unreadable file is a
    one-line :class:`~ptxseg.errors.DataError` (``missing`` / ``cannot read {what} (...)``)."""
    from ptxseg.errors import DataError

    data = read_bytes(path, what, missing=missing, limit=limit)
    try:
        return io.TextIOWrapper(io.BytesIO(data), encoding=encoding).read()
    except UnicodeDecodeError as exc:
        raise DataError(path, f"cannot read {what} ({exc})") from None


def json_depth(obj: Any) -> int:
    """How deep lists and objects nest in ``obj`` (a scalar: 0), walked without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return deepest


def read_json(path: str | Path, what: str, *, missing: str = "file not found",
              limit: int = JSON_LIMIT, depth: int = JSON_DEPTH) -> Any:
    """A JSON file the user named, parsed (:func:`read_text`, at most ``limit`` bytes and
    ``depth`` levels of nesting: a JSON bomb is a one-line refusal, never a RecursionError).

    Raises:
        DataError: see :func:`read_bytes`; not valid JSON; nested deeper than ``depth``.
    """
    from ptxseg.errors import DataError

    text = read_text(path, what, missing=missing, limit=limit)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise DataError(path, f"nested deeper than {depth} levels (not a {what})") from None
    if json_depth(obj) > depth:
        raise DataError(path, f"nested deeper than {depth} levels (not a {what})")
    return obj


def _norm(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower()


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV (BOM and CRLF tolerated) -> (normalised column names, rows keyed by them).

    Column names are stripped and lower-cased; cell values are stripped; blank lines skipped.
    """
    header, rows, _lines = read_csv_lines(path)
    return header, rows


def read_csv_lines(path: str | Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """:func:`read_csv_rows` plus the line of the file each row starts on (1 = the header's
    line; blank lines and quoted newlines counted as in a text editor)."""
    from ptxseg.errors import DataError

    text = read_text(path, "CSV", encoding="utf-8-sig")
    rows, lines = [], []
    try:
        reader = csv.reader(io.StringIO(text))
        end = 0  # the line the previous row ended on
        for r in reader:
            start, end = end + 1, reader.line_num
            if any(c.strip() for c in r):
                rows.append(r)
                lines.append(start)
    except csv.Error as exc:
        raise DataError(path, f"malformed CSV ({exc})") from None
    if not rows:
        raise DataError(path, "CSV is empty (no header)")
    header = [_norm(c) for c in rows[0]]
    out = []
    for r, line in zip(rows[1:], lines[1:], strict=True):
        if len(r) > len(header):
            raise DataError(
                path, f"line {line} has {len(r)} cells but the header has {len(header)}"
            )
        out.append({k: (r[j].strip() if j < len(r) else "") for j, k in enumerate(header)})
    return header, out, lines[1:]


def csv_header(path: str | Path) -> list[str]:
    """The normalised column names of a CSV's first line (``[]`` for anything unreadable)."""
    from ptxseg.errors import DataError

    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline="") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error, DataError):
        return []
    return [_norm(c) for c in first]


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Write a uint8 (H, W) or (H, W, 3 BGR) array as PNG (:func:`encode_png`), atomically."""
    write_bytes(path, encode_png(array, fast=fast, name=str(path)))


def encode_png(array, *, fast: bool = False, name: str = "array") -> bytes:
    """The PNG bytes of a uint8 (H, W) or (H, W, 3 BGR) array.

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
        raise ValueError(f"{name}: could not encode PNG")
    return buf.tobytes()


def save_figure(path: str | Path, fig, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=fmt, **kwargs)
