"""Where predict and export write: every output path checked before any work.

No output may be a file the command reads (inputs, checkpoint, config, thresholds, id maps:
the same file after resolving); a Kaggle CSV may not lie in an input folder; an existing file
that is not an output of the same kind (a previous predict's, recorded in its
``predict.json``; a submission CSV; a ptxseg export) is replaced only with ``overwrite``. A
predict's ``--out`` is locked for the whole run (:func:`output_lock`); a previous predict's
recorded outputs are removed before the first new one is written, and ``predict.json`` records
the new run's ids first (``"status": "running"``), so the folder never mixes two runs, even
after an interrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ptxseg.data.ids import safe_id
from ptxseg.errors import DataError, PtxsegError
from ptxseg.fileio import FolderBusy, folder_lock, not_regular, read_json, read_text, resolved
from ptxseg.image_outputs import DICOM_SEG, MASKS, OVERLAYS, seg_path
from ptxseg.kaggle import is_kaggle_csv

RESULTS_NAME = "results.csv"
PREDICT_JSON = "predict.json"
LOCK_NAME = ".ptxseg-predict.lock"
OUTPUT_SUBDIRS = (MASKS, OVERLAYS)
PROBS = "probs"  # predict --save-probs: probs/<id>.npy


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


def check_out_folder(out: Path) -> None:
    """``--out``: a folder (or a new path whose nearest existing parent is a writable folder)."""
    kind = not_regular(out)
    if kind == "a folder":
        if not os.access(out, os.W_OK | os.X_OK):
            raise PtxsegError(f"{out}: --out is not writable")
        return
    if kind != "missing" or os.path.islink(out):
        what = "a file" if kind is None else kind
        raise PtxsegError(f"{out}: --out must be a folder, but it is {what}")
    parent = next((p for p in Path(os.path.abspath(out)).parents if os.path.lexists(p)), None)
    if parent is None or not parent.is_dir():
        raise PtxsegError(f"{out}: --out cannot be created ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtxsegError(f"{out}: --out cannot be created ({parent} is not writable)")


@dataclass
class OutputPlan:
    """What a prediction will write and read, checked by :func:`plan_outputs`."""

    out: Path
    kaggle_csv: Path | None
    read_files: set[Path]  # resolved paths of every file the command reads
    read_dirs: set[Path]  # resolved input folders (their files are read)
    overwrite: bool = False
    seg_ids: Sequence[str] = ()  # the DICOM inputs of --dicom-seg: dicom_seg/<id>.dcm
    probs: bool = False  # probability maps too (--save-probs)

    def files(self, ids: Sequence[str], overlays: bool) -> list[Path]:
        """The files this run writes inside ``out``."""
        names = [RESULTS_NAME, PREDICT_JSON]
        subs = OUTPUT_SUBDIRS if overlays else OUTPUT_SUBDIRS[:1]
        probs = [self.out / PROBS / f"{i}.npy" for i in ids] if self.probs else []
        return (
            [self.out / n for n in names]
            + [self.out / sub / f"{i}.png" for sub in subs for i in ids]
            + [seg_path(self.out, i) for i in self.seg_ids]
            + probs
        )


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


def plan_outputs(
    out: Path,
    kaggle_csv: Path | None,
    *,
    read_files: Iterable[Path],
    read_dirs: Iterable[Path],
    ids: Sequence[str],
    overlays: bool,
    overwrite: bool,
    seg_ids: Sequence[str] = (),
    probs: bool = False,
) -> OutputPlan:
    """Check every output path before any work (nothing is written here).

    Refused, with one line naming the path: ``--out`` that is not a folder or cannot be
    created, a ``--kaggle-csv`` that is a folder or whose folder is missing; any output that is
    a file the command reads (an input image, the checkpoint, a thresholds or id-map file:
    same file after resolving) or a ``--kaggle-csv`` inside an input folder (outside
    ``--out``); an existing ``--kaggle-csv`` that is not a submission (first line
    ``ImageId,EncodedPixels``) unless ``overwrite``.
    """
    read_files = {resolved(p) for p in read_files}
    read_dirs = {resolved(p) for p in read_dirs}
    check_out_folder(out)
    plan = OutputPlan(out, kaggle_csv, read_files, read_dirs, overwrite, list(seg_ids), probs)
    if kaggle_csv is not None:
        kaggle_r = resolved(kaggle_csv)
        in_out = resolved(out) in kaggle_r.parents
        if in_out and not os.path.lexists(kaggle_csv.parent):  # created with --out
            kind = not_regular(kaggle_csv)
            if kind not in (None, "missing"):
                raise PtxsegError(
                    f"{kaggle_csv}: --kaggle-csv must be a file path, but it is {kind}"
                )
        else:
            check_output_file(kaggle_csv, "--kaggle-csv")
        if kaggle_r in read_files:
            raise PtxsegError(
                f"{kaggle_csv}: --kaggle-csv is one of this command's inputs; refusing to "
                "overwrite it"
            )
        if kaggle_r in {resolved(p) for p in plan.files([], overlays=True)} or (
            any(resolved(out / sub) in kaggle_r.parents
                for sub in (*OUTPUT_SUBDIRS, DICOM_SEG, PROBS))
        ):
            raise PtxsegError(f"{kaggle_csv}: --kaggle-csv is a file that --out itself receives")
        folder = next((d for d in read_dirs if d in kaggle_r.parents), None)
        if folder is not None and not in_out:
            raise PtxsegError(
                f"{kaggle_csv}: --kaggle-csv lies inside the input folder {folder}; write it "
                "elsewhere (e.g. into --out)"
            )
        if os.path.lexists(kaggle_csv) and not overwrite and not is_kaggle_csv(kaggle_csv):
            raise PtxsegError(
                f"{kaggle_csv}: exists and is not a submission CSV (first line "
                "ImageId,EncodedPixels); refusing to replace it (--overwrite to replace it)"
            )
    clash = _clash(plan.files(ids, overlays), read_files)
    if clash is not None:
        raise PtxsegError(
            f"{clash}: is one of this command's inputs and --out {out} would replace it; "
            "choose another --out"
        )
    return plan


@dataclass
class Previous:
    """What a previous ``ptxseg predict`` recorded in an output folder."""

    files: set[Path]  # what it wrote (results.csv, predict.json, masks/, overlays/, dicom_seg/)


def previous_outputs(out: Path) -> Previous | None:
    """The outputs a previous predict recorded in ``out/predict.json`` (its ``ids``, and the
    DICOM SEGs of those ids when it says ``"dicom_seg": true``; files of an older version
    without ``ids``: the ids of its results.csv), or ``None`` when ``out`` holds no readable
    predict.json of ptxseg."""
    path = out / PREDICT_JSON
    if not os.path.lexists(path):
        return None
    try:
        info = read_json(path, "predict.json")
    except DataError:
        return None
    if not isinstance(info, dict) or "ptxseg_version" not in info:
        return None
    ids = info.get("ids")
    if not isinstance(ids, list):  # written before ids were recorded: its results.csv
        try:
            text = read_text(out / RESULTS_NAME, "results.csv")
            ids = [r.get("id", "") for r in csv.DictReader(text.splitlines())]
        except DataError:
            ids = []
    ids = [safe_id(i) for i in ids if isinstance(i, str) and i]
    files = {out / RESULTS_NAME, path}
    files |= {out / sub / f"{i}.png" for sub in OUTPUT_SUBDIRS for i in ids}
    if info.get("dicom_seg") is True:
        files |= {seg_path(out, i) for i in ids}
    files |= {out / PROBS / f"{i}.npy" for i in ids}
    return Previous(files)


def check_existing(plan: OutputPlan, previous: Previous | None, ids: Sequence[str],
                   overlays: bool) -> None:
    """Files this run writes into ``--out`` that exist and were not written by a previous
    predict (recorded in its predict.json) are refused unless ``plan.overwrite``; so are
    recorded files that are now inputs (clearing them would delete an input)."""
    recorded = previous.files if previous is not None else set()
    clash = _clash(recorded, plan.read_files)
    if clash is not None:
        raise PtxsegError(
            f"{clash}: an output of the previous predict into {plan.out} is now an input; "
            "choose another --out"
        )
    if plan.overwrite:
        return
    foreign = [p for p in plan.files(ids, overlays) if p not in recorded and os.path.lexists(p)]
    if foreign:
        n = len(foreign)
        raise PtxsegError(
            f"{plan.out}: {n} file{'s' * (n != 1)} this run would write already "
            f"exist{'s' * (n == 1)} and {'was' if n == 1 else 'were'} not written by a previous "
            "ptxseg predict "
            f"(e.g. {foreign[0]}); choose another --out, or --overwrite to replace them"
        )


def clear_previous(previous: Previous | None) -> None:
    """Remove what a previous predict recorded (and only that), so the folder never mixes
    its masks with this run's results.csv."""
    if previous is None:
        return
    for path in sorted(previous.files, key=lambda p: p.name == PREDICT_JSON):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold ``out``'s lock for the whole prediction: a second ``ptxseg predict`` into the same
    folder is refused at once (naming the first one's pid) instead of interleaving files."""
    try:
        with folder_lock(out, LOCK_NAME):
            yield
    except FolderBusy as exc:
        pid = f" (pid {exc.pid})" if exc.pid else ""
        raise PtxsegError(f"{out}: is in use by another ptxseg predict{pid}") from None
