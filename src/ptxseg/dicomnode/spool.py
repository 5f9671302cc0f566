"""The spool folder of ``ptxseg dicom-node``: every image between its arrival and the delivery
of its results, with its state on disk.

Layout (``KEY`` is the source's SOP Instance UID, checked to be digits and dots):

- ``received/KEY.dcm``: the instance as received (file meta + data set), written before the
  C-STORE is acknowledged (temporary file, fsync, rename, fsync of the folder): once the
  sender has its success status, the image survives a crash of the node or of the machine;
- ``results/KEY/``: its results, ``seg.dcm``, ``sr.dcm`` (and ``sc.dcm``), each written
  atomically, then ``result.json`` (what was found, the UIDs, the times): the marker that the
  results are complete. ``NAME.sent`` is written once ``NAME.dcm`` was acknowledged by the
  destination;
- ``done/KEY.json``: the record of an image whose results were all delivered (its results
  and source are then removed: the spool keeps no image longer than needed);
- ``failed/KEY.dcm`` + ``failed/KEY.json``: an image that could not be segmented (kept, with
  the reason; nothing is sent for it).

What a restart does (:meth:`Spool.recover`), whatever moment a ``kill -9`` hit:

- temporary files (``.*.tmp``) are removed: their rename never happened;
- a ``results/KEY/`` without ``result.json`` is removed and ``KEY`` segmented again from
  ``received/KEY.dcm``: nothing of it was sent (results are sent only once complete);
- a complete ``results/KEY/`` is sent again from its first file without a ``.sent`` marker;
  its ``received/KEY.dcm``, if still there, is removed;
- a ``done/KEY.json`` removes what is left of ``KEY``.

So every received image gets its results delivered, and each result file is sent until one
success status: a kill between the destination's success and the ``.sent`` marker sends that
file once more, with the same SOP Instance UID (results are written once and never
recomputed), which a PACS stores once (Orthanc, like any archive, keeps one instance per SOP
Instance UID). An instance received again after its results were delivered is acknowledged
and not processed again (``done/KEY.json`` says so).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptxseg.errors import DataError
from ptxseg.fileio import atomic_open, fsync_dir, read_bytes, read_json, write_bytes, write_json

RECEIVED = "received"
RESULTS = "results"
DONE = "done"
FAILED = "failed"
RESULT_JSON = "result.json"
SENT_SUFFIX = ".sent"
#: a UID: digits and dots, at most 64 characters (PS3.5 9.1); anything else names no file here
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(uid: str, what: str = "SOP Instance UID") -> str:
    """``uid`` if it is a valid UID (digits and dots, at most 64 characters), else a
    :class:`~ptxseg.errors.DataError`: a UID names spool files, so nothing else may."""
    uid = str(uid or "").strip().rstrip("\x00").strip()
    if not (0 < len(uid) <= 64 and _UID.fullmatch(uid)):
        raise DataError(what, f"not a valid UID ({uid[:80]!r})")
    return uid


@dataclass
class Recovery:
    """What :meth:`Spool.recover` found: images to segment (oldest first), images whose
    results wait to be sent, and what it cleaned."""

    to_segment: list[str] = field(default_factory=list)
    to_send: list[str] = field(default_factory=list)
    removed_partial: int = 0
    removed_tmp: int = 0


class Spool:
    """The spool folder ``root`` (see the module doc). Thread-safe: the C-STORE handlers,
    the worker and the sender share one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------

    def received_path(self, key: str) -> Path:
        return self.root / RECEIVED / f"{key}.dcm"

    def results_dir(self, key: str) -> Path:
        return self.root / RESULTS / key

    def done_path(self, key: str) -> Path:
        return self.root / DONE / f"{key}.json"

    def failed_path(self, key: str) -> Path:
        return self.root / FAILED / f"{key}.dcm"

    # -- start -------------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Create the folders and bring the spool to a consistent state after any stop (see
        the module doc); returns what is left to do."""
        out = Recovery()
        for name in (RECEIVED, RESULTS, DONE, FAILED):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        for folder in (self.root / RECEIVED, self.root / DONE, self.root / FAILED):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                out.removed_tmp += 1
        for results in sorted((self.root / RESULTS).iterdir()):
            key = results.name
            for tmp in results.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                out.removed_tmp += 1
            if self.done_path(key).exists():
                shutil.rmtree(results, ignore_errors=True)
                self.received_path(key).unlink(missing_ok=True)
            elif (results / RESULT_JSON).exists():
                out.to_send.append(key)
                self.received_path(key).unlink(missing_ok=True)
            else:
                shutil.rmtree(results, ignore_errors=True)
                out.removed_partial += 1
        sending = set(out.to_send)
        waiting = []
        for path in (self.root / RECEIVED).glob("*.dcm"):
            key = path.stem
            if key in sending:
                continue
            if self.done_path(key).exists():
                path.unlink(missing_ok=True)
                continue
            waiting.append((path.stat().st_mtime, key))
        out.to_segment = [key for _, key in sorted(waiting)]
        out.to_send.sort(key=lambda k: self.result_record(k).get("received_at", 0.0))
        for name in (RECEIVED, RESULTS):
            fsync_dir(self.root / name)
        return out

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, key: str, data: bytes) -> bool:
        """Write a received instance durably (before its C-STORE is acknowledged). Returns
        False, writing nothing, when the results of ``key`` are already written (waiting to
        be sent, or delivered): the same instance is not segmented twice.

        Raises:
            OSError: the spool cannot be written (full disk...).
        """
        with self._lock:
            if self.done_path(key).exists() or (self.results_dir(key) / RESULT_JSON).exists():
                return False
            path = self.received_path(key)
            with atomic_open(path, "wb") as fh:
                fh.write(data)
            fsync_dir(path.parent)
            return True

    def received_at(self, key: str) -> float:
        """When ``key`` was received (its spool file's time; now if it is gone)."""
        try:
            return self.received_path(key).stat().st_mtime
        except OSError:
            return time.time()

    def fail(self, key: str, reason: str, record: dict[str, Any] | None = None) -> None:
        """Park an image that cannot be segmented in ``failed/`` with the reason."""
        with self._lock:
            src = self.received_path(key)
            write_json(self.root / FAILED / f"{key}.json",
                       {"sop_instance_uid": key, "reason": reason, **(record or {})})  # fmt: skip
            if src.exists():  # copied, then removed: a kill between leaves it to fail again
                write_bytes(self.failed_path(key), read_bytes(src, "spooled DICOM", limit=None))
                src.unlink()
            fsync_dir(self.root / FAILED)
            fsync_dir(self.root / RECEIVED)

    # -- results -----------------------------------------------------------------------------

    def write_results(self, key: str, files: dict[str, bytes], record: dict[str, Any]) -> None:
        """Write the results of ``key`` (``files``: name -> DICOM bytes, in sending order),
        then ``result.json`` (the record, with the file order), then drop the received
        instance: from here on ``key`` is only sent, never segmented again."""
        folder = self.results_dir(key)
        with self._lock:
            if folder.exists() and not (folder / RESULT_JSON).exists():
                shutil.rmtree(folder)  # a partial write of an earlier attempt
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                with atomic_open(folder / f"{name}.dcm", "wb") as fh:
                    fh.write(data)
            write_json(folder / RESULT_JSON, {**record, "files": list(files)})
            fsync_dir(folder)
            fsync_dir(folder.parent)
            self.received_path(key).unlink(missing_ok=True)
            fsync_dir(self.root / RECEIVED)

    def result_record(self, key: str) -> dict[str, Any]:
        """The ``result.json`` of ``key`` (empty if it has none)."""
        try:
            return read_json(self.results_dir(key) / RESULT_JSON, "spool record")
        except (OSError, ValueError, DataError):
            return {}

    def unsent(self, key: str) -> list[tuple[str, Path]]:
        """The result files of ``key`` not yet acknowledged, in sending order."""
        folder = self.results_dir(key)
        names = self.result_record(key).get("files", [])
        return [(n, folder / f"{n}.dcm") for n in names
                if not (folder / f"{n}{SENT_SUFFIX}").exists()]  # fmt: skip

    def mark_sent(self, key: str, name: str) -> None:
        """Record that result ``name`` of ``key`` was acknowledged by the destination."""
        folder = self.results_dir(key)
        with atomic_open(folder / f"{name}{SENT_SUFFIX}", "w", encoding="utf-8") as fh:
            fh.write(f"{time.time():.6f}\n")
        fsync_dir(folder)

    def finish(self, key: str, record: dict[str, Any]) -> None:
        """Record the delivery of every result of ``key`` and remove its files."""
        with self._lock:
            write_json(self.done_path(key), record)
            fsync_dir(self.root / DONE)
            shutil.rmtree(self.results_dir(key), ignore_errors=True)
            fsync_dir(self.root / RESULTS)

    # -- what is in it -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many images are in each state."""
        def count(name: str, pattern: str) -> int:
            with contextlib.suppress(OSError):
                return sum(1 for _ in (self.root / name).glob(pattern))
            return 0

        return {
            "received": count(RECEIVED, "*.dcm"),
            "results": count(RESULTS, "*"),
            "done": count(DONE, "*.json"),
            "failed": count(FAILED, "*.json"),
        }

    def done_records(self) -> Iterator[dict[str, Any]]:
        for path in sorted((self.root / DONE).glob("*.json")):
            with contextlib.suppress(OSError, ValueError, DataError):
                yield read_json(path, "spool record")
