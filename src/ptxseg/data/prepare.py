"""``ptxseg prepare``: a pre-resized copy of a dataset, so that decoding big radiographs does not
starve a fast GPU.

Any layout in (png, siim DICOM + RLE, ptx498, csv), png layout out: ``png_images/ID.png``
(uint8 gray, ``size`` x ``size``) and ``png_masks/ID.png`` (0/255). Images are resized like
at training time (:func:`ptxseg.data.resize.resize_to`), masks with
:func:`ptxseg.data.resize.resize_mask` (aligned with their image). Training on the copy gives
the same model inputs as training on the original, minus the decoding cost.

Ids stay stable: the copy holds ``manifest.csv`` (columns ``id,image,mask,patient_id``) with
each record's ORIGINAL id (and its patient id, where the input has one), and ``--layout auto``
reads a folder with ``png_images/`` + ``manifest.csv`` through that manifest, so a run trained
on the copy has the same ids in its ``split.csv`` as the original dataset (``evaluate --split
val`` works on either). File names are the ids made file-safe by the one rule of
:func:`ptxseg.data.ids.safe_id` (every real SIIM name such as ``0_train_0_`` and every
SOPInstanceUID is its own safe id); the manifest maps them back.

The copy is built in a hidden sibling folder (``.OUT.partial``, marked as prepare's by
:data:`PARTIAL_MARK` inside) and renamed to ``out`` at the end, so an interrupted run leaves no
half dataset; a later prepare removes such a leftover, but never a folder of that name that
prepare did not make. ``out`` itself must be new or empty: prepare replaces nothing (the
output-folder rule, :mod:`ptxseg.output_folder`, at its strictest).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ptxseg.data.ids import safe_id
from ptxseg.data.imageio import load_pair
from ptxseg.data.records import Record, require_ground_truth
from ptxseg.data.resize import resize_mask, resize_to
from ptxseg.errors import DataError
from ptxseg.fileio import write_csv, write_png, write_text
from ptxseg.progress import progress_bar

#: the file that marks ``.OUT.partial`` as prepare's own unfinished copy
PARTIAL_MARK = ".ptxseg-prepare-partial"


def _prepare_one(rec: Record, name: str, tmp: Path, size: int) -> None:
    image, mask = load_pair(rec)  # mask: require_ground_truth ran before
    write_png(tmp / "png_images" / f"{name}.png", resize_to(image, size))
    write_png(tmp / "png_masks" / f"{name}.png", resize_mask(mask, size) * np.uint8(255))


def prepare(
    data: str | Path,
    out: str | Path,
    size: int = 512,
    layout: str = "auto",
    *,
    workers: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    rle: str | Path | None = None,
) -> list[Record]:
    """Write a ``size`` x ``size`` png-layout copy of the dataset ``data`` into ``out``.

    Args:
        data: dataset folder (any layout).
        out: new folder (absent or empty).
        size: side of the written images (the model's ``data.size``).
        layout: layout of ``data`` (``auto`` detects it).
        workers: decoding threads (default: CPU cores, at most 8).
        progress: show a rich progress bar.
        on_progress: called with (done, total) after each image.
        rle: the run-length CSV of a siim folder holding several (``--rle``).

    Returns:
        the records of the copy (sorted by id; the original ids).

    Raises:
        DataError: unusable dataset, an image without ground truth, an unreadable file (named),
            ids that collide once made file-safe, ``out`` not empty.
    """
    from ptxseg.data.sources import load_records

    data, out = Path(data), Path(out)
    if not 32 <= size <= 4096:
        raise DataError(None, f"--size must be in 32..4096, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "output folder exists and is not empty (refusing to mix datasets)")
    records, _layout = load_records(data, layout, rle=rle)
    require_ground_truth(records, data, "prepare writes training pairs")
    for rec in records:  # manifest.csv is UTF-8: an id from a non-UTF-8 file name cannot go in
        try:
            rec.id.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                rec.image, "the id is not valid UTF-8 (rename the file to keep its id)"
            ) from None
    names = [safe_id(r.id) for r in records]
    seen: dict[str, str] = {}
    for rec, name in zip(records, names, strict=True):
        if name.lower() in seen:
            raise DataError(
                data, f"ids '{seen[name.lower()]}' and '{rec.id}' map to the same file name"
            )
        seen[name.lower()] = rec.id

    tmp = out.parent / f".{out.name}.partial"
    if os.path.lexists(tmp):  # an interrupted prepare's leftover; never anyone else's folder
        if os.path.islink(tmp) or not (tmp / PARTIAL_MARK).is_file():
            raise DataError(
                tmp, "exists and is not a partial copy left by ptxseg prepare; remove it or "
                "choose another output folder"
            )
        shutil.rmtree(tmp)
    (tmp / "png_images").mkdir(parents=True)
    (tmp / "png_masks").mkdir(parents=True)
    write_text(tmp / PARTIAL_MARK, "ptxseg prepare: a copy being written\n")
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = pool.map(
                lambda rn: _prepare_one(rn[0], rn[1], tmp, size),
                zip(records, names, strict=True),
            )
            _drain(jobs, len(records), progress, on_progress)
        _write_manifest(tmp / "manifest.csv", records, names)
        (tmp / PARTIAL_MARK).unlink()
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [
        Record(
            rec.id,
            out / "png_images" / f"{name}.png",
            out / "png_masks" / f"{name}.png",
            rec.has_pneumothorax,
            rec.patient_id,
        )
        for rec, name in zip(records, names, strict=True)  # sorted by id (load_records)
    ]


def _drain(jobs, total: int, progress: bool, on_progress) -> None:
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(f"prepare {total} images", total=total)
        for i, _ in enumerate(jobs, start=1):
            bar.advance(task)
            if on_progress is not None:
                on_progress(i, total)


def _write_manifest(path: Path, records: list[Record], names: list[str]) -> None:
    """``manifest.csv``: the original id of each pair (sorted by id), its files and patient."""
    write_csv(
        path,
        ["id", "image", "mask", "patient_id"],
        ([rec.id, f"png_images/{name}.png", f"png_masks/{name}.png", rec.patient_id or ""]
         for rec, name in zip(records, names, strict=True)),
    )
