"""The one rule of an output folder: every command that writes into a folder the user names
(``predict --out``, ``evaluate --out``, ``synth OUT``, ``demo --out``, the out-of-fold report of
``tune CV``) goes through :class:`OutputFolder`:

1. **checked before any work**: the folder is a folder (or can be created under a writable
   one) and no file the command writes is one it reads (the same file after resolving);
2. **locked**: ``.ptxseg-COMMAND.lock`` is held for the whole command, so a second run of the
   same command into the folder is refused at once, naming the first one's pid;
3. **a previous run's outputs replaced, never anyone else's file**: an existing file the run
   would write is replaced only when a previous run of the same command recorded it (its
   record: ``.ptxseg-COMMAND.json``; predict's is ``predict.json``); anything else needs
   ``overwrite`` (``--overwrite``), and a file nobody recorded is never removed;
4. **never two runs mixed**: every file the previous run recorded is removed before the first
   new one is written, and the record lists this run's files first (``"status": "running"``),
   so an interrupted run is cleared by the next; a new folder a failed run leaves empty is
   removed again;
5. **said**: what was replaced and what removed is one line with counts
   (:meth:`OutputFolder.change`).

Single files follow the same rule by their kind: export's ONNX file (a ptxseg export), a
submission CSV (its header), tune's ``thresholds.json`` (one that a tune wrote); ``prepare``
writes a new folder only. This module stands beside :mod:`ptxseg.fileio` (it imports nothing
of the model or the data), so every command can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ptxseg.errors import DataError, PtxsegError
from ptxseg.fileio import FolderBusy, folder_lock, not_regular, read_text, resolved, write_json


def lock_name(command: str) -> str:
    """The lock file a command holds in its output folder: ``.ptxseg-COMMAND.lock``."""
    return f".ptxseg-{command}.lock"


def record_name(command: str) -> str:
    """The record of what a command wrote into its output folder: ``.ptxseg-COMMAND.json``."""
    return f".ptxseg-{command}.json"


def check_output_file(path: Path, option: str, *, create_folder: bool = False) -> None:
    """One output file: not a folder, a FIFO or a symlink loop; its folder exists and is
    writable (``create_folder``: or can be created, under a writable folder).

    Raises:
        PtxsegError: naming ``path`` as the user gave it.
    """
    kind = not_regular(path)
    if kind not in (None, "missing"):
        raise PtxsegError(f"{path}: {option} must be a file path, but it is {kind}")
    parent = path.parent
    parent_kind = not_regular(parent)
    if parent_kind == "missing" and create_folder and not os.path.islink(parent):
        parent = next(p for p in Path(os.path.abspath(parent)).parents if os.path.lexists(p))
        parent_kind = not_regular(parent)
    elif parent_kind == "missing":
        raise PtxsegError(f"{path}: {option}: the folder {parent} does not exist")
    if parent_kind != "a folder":
        what = "a file" if parent_kind is None else parent_kind
        raise PtxsegError(f"{path}: {option}: {parent} is {what}, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtxsegError(f"{path}: {option}: the folder {parent} is not writable")


def check_out_folder(out: Path, option: str = "--out") -> None:
    """An output folder: a folder (or a new path whose nearest existing parent is a writable
    folder)."""
    kind = not_regular(out)
    if kind == "a folder":
        if not os.access(out, os.W_OK | os.X_OK):
            raise PtxsegError(f"{out}: {option} is not writable")
        return
    if kind != "missing" or os.path.islink(out):
        what = "a file" if kind is None else kind
        raise PtxsegError(f"{out}: {option} must be a folder, but it is {what}")
    parent = next((p for p in Path(os.path.abspath(out)).parents if os.path.lexists(p)), None)
    if parent is None or not parent.is_dir():
        raise PtxsegError(f"{out}: {option} cannot be created ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtxsegError(f"{out}: {option} cannot be created ({parent} is not writable)")


def _clash(paths: Iterable[Path], read_files: set[Path]) -> Path | None:
    """The first of ``paths`` that is (after resolving) a file the command reads."""
    resolved_dirs: dict[Path, Path] = {}
    for path in paths:
        parent = resolved_dirs.setdefault(path.parent, resolved(path.parent))
        target = parent / path.name
        if os.path.islink(target):
            target = resolved(target)
        if target in read_files:
            return path
    return None


def files_under(folder: Path) -> set[Path]:
    """Every file (and symlink) below ``folder``, at any depth (none when it is missing)."""
    found: set[Path] = set()
    for root, _dirs, names in os.walk(folder):
        found |= {Path(root) / n for n in names}
    return found


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


# ---------------------------------------------------------------------------------------------
# the one rule


class OutputFolder:
    """One command's output folder under the one rule (see the module doc).

    Use: :meth:`check` with the files the run may write, before any work; ``with
    folder.hold(files):`` around the work; inside it, :meth:`start` just before the first file
    is written and :meth:`finish` after the last, which returns the line that says what was
    replaced and removed (:meth:`change`).

    Args:
        out: the folder (created by :meth:`hold` when missing).
        command: the command's name: its lock and record files, and its messages.
        overwrite: replace existing files that no previous run of ``command`` recorded.
        read_files: files the command reads (none may be an output, nor a recorded file that
            the previous run's removal would delete).
        option: how the user named ``out`` in messages (``--out``, ``OUT``).
        legacy: the files of an older ptxseg's run of ``command`` in ``out``, which wrote no
            record (``None``: not one).
    """

    def __init__(
        self,
        out: str | Path,
        command: str,
        *,
        overwrite: bool = False,
        read_files: Iterable[str | Path] = (),
        option: str = "--out",
        legacy: Callable[[Path], set[Path] | None] | None = None,
    ):
        self.out = Path(out)
        self.command = command
        self.overwrite = overwrite
        self.option = option
        self.read_files = {resolved(p) for p in read_files}
        self.legacy = legacy
        self.previous: set[Path] = set()  # what the previous run recorded (read by start)
        self.files: list[Path] = []  # what this run writes (start), then wrote (finish)
        self.record: dict[str, Any] = {}

    @property
    def record_path(self) -> Path:
        return self.out / record_name(self.command)

    @property
    def lock_path(self) -> Path:
        return self.out / lock_name(self.command)

    def inside(self, name: Any) -> Path | None:
        """``out / name`` for a relative POSIX path that stays inside ``out``, else ``None``
        (a record edited to name ``../x`` or ``/etc/x`` can remove nothing outside it)."""
        if not isinstance(name, str) or not name or "\x00" in name:
            return None
        rel = PurePosixPath(name)
        if rel.is_absolute() or any(part in (".", "..") for part in rel.parts):
            return None
        return self.out.joinpath(*rel.parts)

    def recorded(self) -> set[Path] | None:
        """The files the previous run of the command recorded in ``out`` (its record among
        them), or ``None`` when ``out`` holds no record of one."""
        path = self.record_path
        if not os.path.lexists(path):
            return self.legacy(self.out) if self.legacy is not None else None
        try:
            info = json.loads(read_text(path, "record"))
        except (DataError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("command") != self.command:
            return None
        files = info.get("files")
        listed = [self.inside(name) for name in files] if isinstance(files, list) else []
        return {path} | {p for p in listed if p is not None}

    # ---- before any work

    def check(self, files: Iterable[Path]) -> None:
        """Before any work (nothing is written): ``out`` is a folder or can be created, none
        of ``files`` is one of the command's inputs, and none exists that the previous run
        did not record (unless ``overwrite``).

        Raises:
            PtxsegError: one line naming the path.
        """
        files = list(files)
        check_out_folder(self.out, self.option)
        clash = _clash(files, self.read_files)
        if clash is not None:
            raise PtxsegError(
                f"{clash}: is one of this command's inputs and {self.option} {self.out} would "
                f"replace it; choose another {self.option}"
            )
        self._check_existing(files, self.recorded())

    def _check_existing(self, files: Sequence[Path], previous: set[Path] | None) -> None:
        recorded = previous or set()
        clash = _clash(recorded, self.read_files)
        if clash is not None:
            raise PtxsegError(
                f"{clash}: an output of the previous {self.command} into {self.out} is now an "
                f"input; choose another {self.option}"
            )
        if self.overwrite:
            return
        foreign = [p for p in files if p not in recorded and os.path.lexists(p)]
        if foreign:
            n = len(foreign)
            raise PtxsegError(
                f"{self.out}: {n} file{'s' * (n != 1)} this run would write already "
                f"exist{'s' * (n == 1)} and {'was' if n == 1 else 'were'} not written by a "
                f"previous ptxseg {self.command} (e.g. {foreign[0]}); choose another "
                f"{self.option}, or --overwrite to replace them"
            )

    # ---- around the work

    @contextlib.contextmanager
    def hold(self, files: Iterable[Path] = ()) -> Iterator[OutputFolder]:
        """Create ``out`` when missing and lock it for the block (``.ptxseg-COMMAND.lock``);
        ``files`` are checked again under the lock (a run may have written meanwhile). A folder
        created here is removed again when the block fails and leaves it empty.

        Raises:
            PtxsegError: another run of the command holds the lock (naming its pid), or
                ``out`` cannot be created.
        """
        files = list(files)
        created = [p for p in (self.out, *self.out.parents) if not os.path.lexists(p)]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PtxsegError(
                f"{self.out}: cannot create {self.option} ({exc.strerror or exc})"
            ) from None
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(folder_lock(self.out, self.lock_path.name))
                except FolderBusy as exc:
                    pid = f" (pid {exc.pid})" if exc.pid else ""
                    raise PtxsegError(
                        f"{self.out}: is in use by another ptxseg {self.command}{pid}"
                    ) from None
                self._check_existing(files, self.recorded())
                yield self
        except BaseException:
            for path in created:  # a new folder that holds nothing yet is removed again
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise

    def start(self, files: Iterable[Path], record: dict[str, Any] | None = None) -> None:
        """Just before the first new file (inside :meth:`hold`): every file the previous run
        recorded is removed (its record last; folders it leaves empty too), then this run's
        record is written: ``record``, ``"status": "running"`` and ``files``."""
        self.files = list(files)
        self.record = dict(record or {})
        # what the record lists and exists (a record lists probability maps, SEGs... that
        # a run may not have written)
        self.previous = {p for p in self.recorded() or () if os.path.lexists(p)}
        _remove(self.previous, last=self.record_path, stop=self.out)
        self.write_record("running")

    def finish(self, results: dict[str, Any] | None = None) -> str | None:
        """After the last file: the record lists the files this run wrote (``"status":
        "done"``, ``results``). Returns :meth:`change`."""
        self.files = [p for p in self.files if os.path.lexists(p)]
        self.write_record("done", results)
        return self.change()

    def write_record(self, status: str, results: dict[str, Any] | None = None) -> None:
        """``.ptxseg-COMMAND.json``: the ptxseg version, the command, ``record``, the status,
        ``results`` and the files (relative POSIX paths, sorted)."""
        from ptxseg import __version__

        names = sorted({p.relative_to(self.out).as_posix() for p in self.files
                        if p != self.record_path})  # fmt: skip
        write_json(self.record_path, {
            "ptxseg_version": __version__, "command": self.command, **self.record,
            "status": status, **(results or {}), "files": names,
        })  # fmt: skip

    def change(self) -> str | None:
        """One line: which of the previous run's files this run wrote again and which it
        removed (it does not write them), counted by folder; ``None`` without a previous run
        (its record is not counted)."""
        previous = [p for p in self.previous if p != self.record_path]
        if not previous:
            return None
        again = [p for p in previous if os.path.lexists(p)]
        gone = [p for p in previous if not os.path.lexists(p)]
        text = f"{self.out}: the previous {self.command}'s outputs were replaced: "
        parts = []
        if again:
            parts.append(f"{_plural(len(again), 'file')} written again ({self._groups(again)})")
        if gone:
            parts.append(f"{len(gone)} removed, not written by this run ({self._groups(gone)})")
        return text + " and ".join(parts)

    def _groups(self, paths: Sequence[Path]) -> str:
        """``"12 in dicom_seg/, submission.csv"``: files counted by their top folder in
        ``out``; files directly in ``out`` named."""
        folders: Counter[str] = Counter()
        names = []
        for path in paths:
            parts = path.relative_to(self.out).parts
            if len(parts) > 1:
                folders[parts[0]] += 1
            else:
                names.append(parts[0])
        return ", ".join([f"{n} in {f}/" for f, n in sorted(folders.items())] + sorted(names))


def _remove(paths: Iterable[Path], *, last: Path, stop: Path) -> None:
    """Remove ``paths`` (``last`` after the others), then the folders that this leaves empty,
    up to (not including) ``stop``."""
    folders: set[Path] = set()
    for path in sorted(paths, key=lambda p: p == last):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
            folders |= {p for p in path.parents if stop in p.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: someone else's files are in it
            folder.rmdir()
