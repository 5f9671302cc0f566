"""Where predict writes: its output paths, checked before any work, under the one output-folder
rule (:mod:`ptxseg.output_folder`: ``--out`` locked, a previous predict's outputs replaced and
said, never anyone else's file without ``--overwrite``).

No output may be a file the command reads (inputs, checkpoint, config, thresholds, id maps:
the same file after resolving); a Kaggle CSV may not lie in an input folder, and an existing
one that is not a submission is replaced only with ``overwrite``. predict's record is its
``predict.json``: the ids it predicted (so ``masks/``, ``overlays/``, ``probs/`` files), whether
it wrote DICOM SEGs, and a Kaggle CSV it wrote inside ``--out``; all of them are removed before
the first new output, so the folder never mixes two runs, even after an interrupted one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptxseg.data.ids import safe_id
from ptxseg.errors import DataError, PtxsegError
from ptxseg.fileio import (
    not_regular,
    read_json,
    read_text,
    resolved,
    write_json,
)
from ptxseg.image_outputs import DICOM_SEG, MASKS, OVERLAYS, seg_path
from ptxseg.kaggle import is_kaggle_csv
from ptxseg.output_folder import (
    OutputFolder,
    check_out_folder,
    check_output_file,
    lock_name,
)

RESULTS_NAME = "results.csv"
PREDICT_JSON = "predict.json"
OUTPUT_SUBDIRS = (MASKS, OVERLAYS)
PROBS = "probs"  # predict --save-probs: probs/<id>.npy
LOCK_NAME = lock_name("predict")


# ---------------------------------------------------------------------------------------------
# predict


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
        """The files this run writes inside ``out`` (but the Kaggle CSV, whose kind decides:
        :func:`plan_outputs`)."""
        names = [RESULTS_NAME, PREDICT_JSON]
        subs = OUTPUT_SUBDIRS if overlays else OUTPUT_SUBDIRS[:1]
        probs = [self.out / PROBS / f"{i}.npy" for i in ids] if self.probs else []
        return (
            [self.out / n for n in names]
            + [self.out / sub / f"{i}.png" for sub in subs for i in ids]
            + [seg_path(self.out, i) for i in self.seg_ids]
            + probs
        )

    def kaggle_in_out(self) -> bool:
        """Whether the Kaggle CSV lies inside ``out`` (one of the folder's outputs)."""
        return self.kaggle_csv is not None and resolved(self.out) in resolved(
            self.kaggle_csv
        ).parents

    def kaggle_name(self) -> str | None:
        """The Kaggle CSV's path relative to ``out`` when it lies inside, as recorded in
        ``predict.json``."""
        if not self.kaggle_in_out():
            return None
        assert self.kaggle_csv is not None
        return resolved(self.kaggle_csv).relative_to(resolved(self.out)).as_posix()


class PredictFolder(OutputFolder):
    """predict's ``--out`` under the one rule; its record is ``predict.json`` (what was run,
    the ids, whether SEGs and a Kaggle CSV inside ``--out`` were written)."""

    def __init__(self, out: str | Path, *, overwrite: bool = False,
                 read_files: Iterable[str | Path] = ()):
        super().__init__(out, "predict", overwrite=overwrite, read_files=read_files)

    @property
    def record_path(self) -> Path:
        return self.out / PREDICT_JSON

    def recorded(self) -> set[Path] | None:
        return previous_outputs(self.out)

    def write_record(self, status: str, results: dict[str, Any] | None = None) -> None:
        write_json(self.record_path, {**self.record, "status": status, **(results or {})})


def plan_outputs(
    folder: PredictFolder,
    kaggle_csv: Path | None,
    *,
    read_dirs: Iterable[Path],
    ids: Sequence[str],
    overlays: bool,
    seg_ids: Sequence[str] = (),
    probs: bool = False,
) -> OutputPlan:
    """Check every output path before any work (nothing is written here).

    Refused, with one line naming the path: ``--out`` that is not a folder or cannot be
    created, a ``--kaggle-csv`` that is a folder or whose folder is missing; any output that is
    a file the command reads (an input image, the checkpoint, a thresholds or id-map file:
    same file after resolving) or a ``--kaggle-csv`` inside an input folder (outside
    ``--out``); an existing ``--kaggle-csv`` that is not a submission (first line
    ``ImageId,EncodedPixels``) unless ``overwrite``; an existing output in ``--out`` that no
    previous predict recorded, unless ``overwrite`` (:meth:`OutputFolder.check`).
    """
    out, overwrite, read_files = folder.out, folder.overwrite, folder.read_files
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
        inside = next((d for d in read_dirs if d in kaggle_r.parents), None)
        if inside is not None and not in_out:
            raise PtxsegError(
                f"{kaggle_csv}: --kaggle-csv lies inside the input folder {inside}; write it "
                "elsewhere (e.g. into --out)"
            )
        if os.path.lexists(kaggle_csv) and not overwrite and not is_kaggle_csv(kaggle_csv):
            raise PtxsegError(
                f"{kaggle_csv}: exists and is not a submission CSV (first line "
                "ImageId,EncodedPixels); refusing to replace it (--overwrite to replace it)"
            )
    folder.check(plan.files(ids, overlays))
    return plan


def previous_outputs(out: Path) -> set[Path] | None:
    """The outputs a previous predict recorded in ``out/predict.json`` (its ``ids``; the DICOM
    SEGs of those ids when it says ``"dicom_seg": true``; the Kaggle CSV it wrote inside
    ``out``, ``kaggle_csv``; files of an older version without ``ids``: the ids of its
    results.csv), or ``None`` when ``out`` holds no readable predict.json of ptxseg."""
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
    kaggle = OutputFolder(out, "predict").inside(info.get("kaggle_csv"))
    if kaggle is not None:
        files.add(kaggle)
    return files
