"""Predict pneumothorax masks for new radiographs: ``ptxseg predict RUN INPUT... --out DIR``.

Inputs
    Image files (PNG, JPEG, TIFF, BMP, DICOM of any bit depth) and folders. A folder that is a
    dataset of a known layout (``png_images/``, ``Site*/``, a manifest CSV; see
    :mod:`ptxseg.data.sources`) gives exactly that dataset's images (masks are not images to
    predict); so does a manifest CSV named directly. Any other folder is searched recursively
    for files with an image suffix (``.png .jpg .jpeg .tif .tiff .bmp .dcm .dicom``, any case)
    and for suffix-less DICOM files (``DICM`` magic); hidden files and the output folder are
    skipped, and other files are counted and named in a note. A file given by name is always
    predicted (an unreadable one becomes an error row). A folder of DICOMs is read as plain
    files, so no run-length CSV is needed. Only regular files are read: a FIFO (``/dev/stdin``
    included), a device or a symlink loop where an image should be is an error row
    (``not a regular file (a FIFO)``, ``symlink loop``), never a read that waits forever.

Ids
    The file stem (a dataset's record id for layout folders), with path separators and
    characters Windows refuses replaced by ``_``; a byte of the name that is not UTF-8 becomes
    ``_xff`` (``bad\\xff.png`` -> ``bad_xff``; ``results.csv`` shows the source as
    ``bad\\xff.png``: :func:`ptxseg.errors.printable`). Ids that collide (case-insensitively, so the
    output also works on macOS/Windows disks) keep the first one in input order (arguments in
    the order given, folders sorted) and the later ones get ``__2``, ``__3``... The ``source``
    column of results.csv names each file. The same file named twice is predicted once.

Post-processing
    The one :func:`ptxseg.postprocess.binarize` of tune and evaluate, on the probabilities
    resized back to the image's native size, with areas scaled by
    :func:`ptxseg.postprocess.area_scale`. Thresholds come from ``--thresholds FILE`` or
    ``RUN/thresholds.json``; when neither exists the run has not been tuned, and the
    defaults (``probs > 0.5``, no component removal) are used with a warning (recorded as
    ``"thresholds_source": "default"`` in ``predict.json``).

Outputs (all written atomically)
    ``masks/<id>.png`` ({0, 255}, native size), ``overlays/<id>.png`` (the radiograph with the
    predicted region tinted and outlined in red, longest side capped at ``OVERLAY_MAX_SIDE``;
    a plain gray copy of the radiograph when nothing is predicted), ``results.csv`` (one row
    per input, in input order), ``predict.json`` (what was run), and with ``kaggle_csv`` a
    SIIM-ACR submission (``ImageId,EncodedPixels``; ImageId = the DICOM SOPInstanceUID, else
    the ImageId the ``id_maps`` give the file name, else the id; ``-1`` for an empty mask;
    unreadable files have no row).

    Every output path is checked before any work (:func:`plan_outputs`): no output may be a
    file the command reads (inputs, checkpoint, config, thresholds, id maps), a Kaggle CSV may
    not lie in an input folder, and an existing file that is not an output of the same kind (a
    previous predict's, recorded in its ``predict.json``; a submission CSV) is replaced only
    with ``overwrite``. ``--out`` is locked for the whole run (:func:`output_lock`); a
    previous predict's recorded outputs are removed before the first new one is written, and
    ``predict.json`` records this run's ids first (``"status": "running"``), so the folder
    never mixes two runs, even after an interrupted one.

Speed
    Reading/decoding runs in DataLoader workers and resizing back, binarizing and PNG encoding
    in a thread pool, both overlapped with the model; only a bounded number of images is in
    flight, so memory does not grow with the number of inputs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ptxseg.errors import DataError, PtxsegError, one_line, printable
from ptxseg.fileio import not_regular, resolved
from ptxseg.postprocess import (  # DEFAULT_PARAMS: re-exported for callers of predict
    DEFAULT_PARAMS,  # noqa: F401
    PostParams,
    area_scale,
    binarize,
    default_rule_warning,
    resolve_thresholds,
    with_model_size,
)
from ptxseg.progress import progress_bar
from ptxseg.report import shrink_to

BACKENDS = ("torch", "onnx")
RESULTS_COLUMNS = (
    "id",
    "source",
    "height",
    "width",
    "has_pneumothorax",
    "area_px",
    "area_fraction",
    "max_prob",
    "status",
)
KAGGLE_COLUMNS = ("ImageId", "EncodedPixels")
OVERLAY_MAX_SIDE = 1024  # overlays are for looking at; masks keep the full native size
OVERLAY_ALPHA = 0.35
OVERLAY_BGR = (40, 40, 255)  # red, as the prediction contours of the evaluation report
COMPILE_MIN_IMAGES = 1000  # torch.compile warm-up pays off only on large folders (CUDA)
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class InputEntry:
    """One image to predict: its output id and its file."""

    id: str
    path: Path


@dataclass
class Inputs:
    entries: list[InputEntry]
    notes: list[str] = field(default_factory=list)  # what was skipped or how folders were read


MAX_ID_BYTES = 200  # ids name files (<id>.png, temp names): stay below the 255-byte limit


def safe_id(name: str) -> str:
    """A file-name-safe id: path separators, ``:*?"<>|`` and control characters -> ``_``
    (a byte that is not UTF-8 -> ``_xff``: :func:`~ptxseg.errors.printable`, then ``\\`` ->
    ``_``); ids longer than ``MAX_ID_BYTES`` are cut and end with a hash of the whole name."""
    out = _UNSAFE.sub("_", printable(name)).strip()
    if not out or out.startswith("."):
        out = "_" + out
    if len(out.encode()) > MAX_ID_BYTES:
        digest = hashlib.sha1(out.encode()).hexdigest()[:10]
        head = out.encode()[: MAX_ID_BYTES - 12].decode(errors="ignore")
        out = f"{head}~{digest}"
    return out


def unique_ids(pairs: Sequence[tuple[str, Path]]) -> list[InputEntry]:
    """Make ids unique (case-insensitively), deterministically: the first of a colliding group
    in input order keeps its id, later ones get ``__2``, ``__3``... (skipping ids in use)."""
    natural = [safe_id(ident) for ident, _ in pairs]
    taken = {n.casefold() for n in natural}
    seen: set[str] = set()
    out = []
    for ident, (_, path) in zip(natural, pairs, strict=True):
        key = ident.casefold()
        if key in seen:
            k = 2
            while f"{ident}__{k}".casefold() in taken:
                k += 1
            ident = f"{ident}__{k}"
            key = ident.casefold()
            taken.add(key)
        seen.add(key)
        out.append(InputEntry(ident, path))
    return out


def _is_image_file(path: Path) -> bool:
    from ptxseg.data.imageio import IMAGE_SUFFIXES, is_dicom

    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    return suffix == "" and is_dicom(path)


def _inside(path: Path, folders: Iterable[Path]) -> bool:
    """``path`` is one of ``folders`` or lies below one (resolved paths)."""
    return any(path == f or f in path.parents for f in folders)


def scan_folder(folder: Path, exclude: Sequence[Path] = ()) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursive, sorted by relative path, like ``find | sort``)
    and the other files skipped.

    Hidden files and folders and anything under ``exclude`` (resolved paths) are ignored.
    Entries that are not regular files (a FIFO, a symlink loop...) are listed as images when
    their name says so, and fail with their reason when read (an error row, never a hang).
    """
    images, skipped = [], []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not _inside(resolved(root_path / d), exclude)
        ]
        for name in files:
            if name.startswith("."):
                continue
            path = root_path / name
            (images if _is_image_file(path) else skipped).append(path)

    def key(p: Path) -> tuple[str, ...]:
        return p.relative_to(folder).parts

    return sorted(images, key=key), sorted(skipped, key=key)


def _dataset_pairs(folder: Path) -> tuple[list[tuple[str, Path]], str] | None:
    """The images of a dataset folder of a known layout (png, ptx498, csv; or a manifest CSV
    file), or ``None``.

    SIIM folders are read as plain files (every DICOM, no run-length CSV needed), which is
    also how a folder of DICOMs without a CSV is detected.
    """
    from ptxseg.data.sources import detect_layout, scan

    try:
        layout = detect_layout(folder)
    except DataError:
        return None
    if layout == "siim":
        return None
    try:
        found = scan(folder, layout, labels=False)
    except DataError:
        return None
    pairs = [(r.id, Path(r.image)) for r in found.records]
    # a FIFO, a symlink loop... where an image (not a mask) should be: an error row
    have = {str(path) for _, path in pairs}
    for p in found.problems:
        path = Path(p.path)
        image = (layout == "png" and path.parent.name == "png_images") or (
            layout == "ptx498" and ".1.img." in path.name.lower()
        )
        if p.kind == "irregular" and image and p.path not in have:
            pairs.append((path.stem, path))
    return pairs, layout


def collect_inputs(inputs: Sequence[str | Path], *, exclude: Sequence[Path] = ()) -> Inputs:
    """Resolve INPUT arguments (files, folders, dataset folders) into unique-id entries.

    Raises:
        DataError: an input that does not exist, or no image at all.
    """
    pairs: list[tuple[str, Path]] = []
    notes: list[str] = []
    exclude = [resolved(p) for p in exclude]
    for raw in inputs:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".csv":
            dataset = _dataset_pairs(path)
            if dataset is None:
                raise DataError(path, "a CSV input must be a manifest with columns image,mask")
            pairs.extend(dataset[0])
            notes.append(f"{path}: read as a manifest: {len(dataset[0])} images")
        elif path.is_file():
            pairs.append((path.stem, path))
        elif path.is_dir():
            dataset = _dataset_pairs(path)
            if dataset is not None:
                found, layout = dataset
                pairs.extend(found)
                notes.append(
                    f"{path}: read as a {layout} dataset: {len(found)} images "
                    "(masks and other files are not predicted)"
                )
                continue
            images, skipped = scan_folder(path, exclude)
            if not images:
                raise DataError(
                    path, "no images found (PNG, JPEG, TIFF, BMP or DICOM files, recursively)"
                )
            pairs.extend((p.stem, p) for p in images)
            if skipped:
                names = ", ".join(p.name for p in skipped[:3])
                more = "..." if len(skipped) > 3 else ""
                what = "1 file that is not an image" if len(skipped) == 1 else (
                    f"{len(skipped)} files that are not images"
                )
                notes.append(f"{path}: skipped {what} ({names}{more})")
        elif os.path.lexists(path):  # a FIFO, a device, a symlink loop: an error row
            pairs.append((path.stem, path))
        else:
            raise DataError(path, "no such file or folder")
    seen: dict[Path, Path] = {}
    unique: list[tuple[str, Path]] = []
    for ident, path in pairs:
        key = resolved(path)
        if key in seen:
            notes.append(f"{path}: named more than once, predicted once")
            continue
        seen[key] = path
        unique.append((ident, path))
    if not unique:
        raise DataError(None, "no images to predict")
    return Inputs(unique_ids(unique), notes)


# ---------------------------------------------------------------------------------------------
# thresholds and backends


@dataclass
class Backend:
    """A loaded model: ``model`` is a torch module or an :class:`~ptxseg.export.OnnxModel`."""

    model: Any
    size: int
    name: str
    description: str
    pad_to_batch: bool = False


def open_backend(
    run: Path,
    backend: str = "torch",
    *,
    model_path: Path | None = None,
    device: str = "auto",
    compile: bool | None = None,
    n_images: int = 0,
) -> Backend:
    """Load the run's model for the ``torch`` backend (``RUN/best.ckpt`` + ``config.yaml``,
    or ``model_path`` as the checkpoint) or the ``onnx`` backend (``RUN/model.onnx`` or
    ``model_path``; the config is not read: the file's metadata says how to preprocess).

    ``compile=None`` compiles on CUDA for at least :data:`COMPILE_MIN_IMAGES` images.
    """
    from ptxseg.inference import autocast_dtype, pick_device, prepare_model

    if backend not in BACKENDS:
        raise PtxsegError(f"--backend: unknown '{backend}' (valid: {', '.join(BACKENDS)})")
    run = Path(run)
    if backend == "onnx":
        from ptxseg.export import OnnxModel, onnx_providers

        want_cuda = device != "cpu"
        model = OnnxModel(model_path or run / "model.onnx", onnx_providers(want_cuda))
        return Backend(model, model.size, "onnx", f"onnx {model.describe()}")
    from ptxseg.config import load_run_config
    from ptxseg.model import load_model

    cfg = load_run_config(run)
    ckpt = Path(model_path) if model_path is not None else run / "best.ckpt"
    model = load_model(cfg, ckpt)
    dev = pick_device(device)
    do_compile = compile
    if do_compile is None:
        do_compile = dev.type == "cuda" and n_images >= COMPILE_MIN_IMAGES
    model = prepare_model(model, dev, compile=bool(do_compile))
    what = f"{cfg.model.arch}/{cfg.model.encoder}, {cfg.data.size} px, {dev.type}"
    dtype = autocast_dtype(dev)
    if dtype is not None:
        what += f", {str(dtype).removeprefix('torch.')} autocast, channels_last"
    if do_compile:
        what += ", compiled"
    return Backend(model, cfg.data.size, "torch", f"torch {ckpt} ({what})", bool(do_compile))


# ---------------------------------------------------------------------------------------------
# Kaggle ImageIds of files that are not DICOM (--id-map)

ID_MAP_COLUMNS = ("new_filename", "imageid")


def load_id_map(paths: Sequence[str | Path]) -> tuple[dict[str, str], dict[str, str | None]]:
    """Read SIIM ``stage_1_*_images.csv`` files (``new_filename,ImageId[,has_pneumo]``).

    Returns:
        ``(by_name, by_stem)``: file name -> ImageId, and file stem -> ImageId (``None`` where
        two rows with the same stem give different ImageIds).

    Raises:
        DataError: an unreadable file, other columns, an empty cell, or one file name given
            two different ImageIds.
    """
    from ptxseg.data.sources import read_csv_rows

    by_name: dict[str, tuple[str, str]] = {}  # name -> (ImageId, where)
    by_stem: dict[str, str | None] = {}
    for path in paths:
        header, rows = read_csv_rows(Path(path))
        if not all(c in header for c in ID_MAP_COLUMNS):
            raise DataError(
                path,
                "an id map needs the columns new_filename,ImageId (as the SIIM "
                f"stage_1_*_images.csv), found {','.join(header) or 'none'}",
            )
        for i, row in enumerate(rows, start=2):
            name, uid = row["new_filename"], row["imageid"]
            if not name or not uid:
                raise DataError(path, f"line {i}: empty new_filename or ImageId")
            where = f"line {i} of {path}"
            if name in by_name and by_name[name][0] != uid:
                raise DataError(
                    path,
                    f"line {i}: '{name}' has ImageId {uid} here but {by_name[name][0]} at "
                    f"{by_name[name][1]}",
                )
            by_name[name] = (uid, where)
            stem = Path(name).stem
            by_stem[stem] = uid if by_stem.get(stem, uid) == uid else None
    return {k: v[0] for k, v in by_name.items()}, by_stem


def mapped_kaggle_ids(entries: Sequence[InputEntry], maps: Sequence[str | Path]) -> dict[str, str]:
    """id -> ImageId from the id maps for every input that is not a DICOM (whose ImageId is its
    SOPInstanceUID), matched by file name, with or without its extension.

    Raises:
        PtxsegError: some inputs are not in the maps (how many, and one example).
    """
    from ptxseg.data.imageio import is_dicom
    by_name, by_stem = load_id_map(maps)
    found: dict[str, str] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    for entry in entries:
        path = entry.path
        if not_regular(path) is not None or is_dicom(path):
            continue  # unreadable (an error row) or a DICOM with its own ImageId
        uid = by_name.get(path.name) or by_name.get(path.stem)
        if uid is None and path.stem in by_stem:
            uid = by_stem[path.stem]
            if uid is None:
                ambiguous.append(str(path))
                continue
        if uid is None:
            missing.append(str(path))
        else:
            found[entry.id] = uid
    maps_text = ", ".join(str(m) for m in maps)
    if missing:
        n = len(missing)
        raise PtxsegError(
            f"--id-map {maps_text}: {n} of {len(entries)} input{'s' * (len(entries) != 1)} "
            f"{'is' if n == 1 else 'are'} not in the map (e.g. {missing[0]}); every image "
            "needs its ImageId (DICOMs use their SOPInstanceUID)"
        )
    if ambiguous:
        raise PtxsegError(
            f"--id-map {maps_text}: {ambiguous[0]} matches rows of different ImageIds by its "
            "stem (name the files as in new_filename)"
        )
    return found


# ---------------------------------------------------------------------------------------------
# output paths: checked before any work, never an input, never someone else's file

RESULTS_NAME = "results.csv"
PREDICT_JSON = "predict.json"
LOCK_NAME = ".ptxseg-predict.lock"
OUTPUT_SUBDIRS = ("masks", "overlays")


def is_kaggle_csv(path: Path) -> bool:
    """Whether ``path`` is a regular file whose first line is exactly ``ImageId,EncodedPixels``
    (a submission written by ``--kaggle-csv``)."""
    from ptxseg.fileio import open_regular

    try:
        with open_regular(path) as fh:
            head = fh.read(64)
    except (OSError, DataError):
        return False
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return first == ",".join(KAGGLE_COLUMNS).encode()


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

    def files(self, ids: Sequence[str], overlays: bool) -> list[Path]:
        """The files this run writes inside ``out``."""
        names = [RESULTS_NAME, PREDICT_JSON]
        subs = OUTPUT_SUBDIRS if overlays else OUTPUT_SUBDIRS[:1]
        return [self.out / n for n in names] + [
            self.out / sub / f"{i}.png" for sub in subs for i in ids
        ]


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
    plan = OutputPlan(out, kaggle_csv, read_files, read_dirs, overwrite)
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
            any(resolved(out / sub) in kaggle_r.parents for sub in OUTPUT_SUBDIRS)
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

    files: set[Path]  # the files it wrote (results.csv, predict.json, masks/*, overlays/*)


def previous_outputs(out: Path) -> Previous | None:
    """The outputs a previous predict recorded in ``out/predict.json`` (its ``ids`` and
    ``overlays``; files of an older version without ``ids``: the ids of its results.csv), or
    ``None`` when ``out`` holds no readable predict.json of ptxseg."""
    import json

    from ptxseg.fileio import read_text

    path = out / PREDICT_JSON
    if not os.path.lexists(path):
        return None
    try:
        info = json.loads(read_text(path, "predict.json"))
    except (DataError, ValueError):
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
    from ptxseg.fileio import FolderBusy, folder_lock

    try:
        with folder_lock(out, LOCK_NAME):
            yield
    except FolderBusy as exc:
        pid = f" (pid {exc.pid})" if exc.pid else ""
        raise PtxsegError(f"{out}: is in use by another ptxseg predict{pid}") from None


# ---------------------------------------------------------------------------------------------
# per-image outputs


def draw_prediction(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The radiograph with the predicted region tinted and outlined (BGR, for PNG writing);
    with an empty mask, the radiograph itself (one channel: a third of the PNG encoding).

    Shape:
        - image: ``(H, W)`` uint8; mask: ``(H, W)`` {0, 1}
        - output: ``(h, w, 3)`` uint8 (``(h, w)`` when the mask is empty), longest side at
          most :data:`OVERLAY_MAX_SIDE`
    """
    image, mask = shrink_to(OVERLAY_MAX_SIDE, image, mask)
    if not mask.any():
        return np.ascontiguousarray(image)
    mask = mask.astype(np.uint8, copy=False)
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    tint = np.empty_like(bgr)
    tint[:] = OVERLAY_BGR
    blended = cv2.addWeighted(bgr, 1.0 - OVERLAY_ALPHA, tint, OVERLAY_ALPHA, 0.0)
    cv2.copyTo(blended, mask, bgr)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(bgr.shape[:2]) / 400))
    cv2.drawContours(bgr, contours, -1, OVERLAY_BGR, thickness)
    return bgr


@dataclass
class ImageResult:
    """One row of results.csv (and of the Kaggle CSV when ``rle`` is set)."""

    id: str
    source: str
    height: int = 0
    width: int = 0
    has_pneumothorax: bool | None = None
    area_px: int | None = None
    area_fraction: float | None = None
    max_prob: float | None = None
    status: str = "ok"
    kaggle_id: str | None = None
    rle: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> list[str]:
        if not self.ok:
            return [self.id, printable(self.source), "", "", "", "", "", "", printable(self.status)]
        return [
            self.id,
            printable(self.source),
            str(self.height),
            str(self.width),
            str(int(bool(self.has_pneumothorax))),
            str(self.area_px),
            f"{self.area_fraction:.6f}",
            f"{self.max_prob:.6f}",
            self.status,
        ]


@dataclass(frozen=True)
class _Post:
    params: PostParams
    out: Path
    overlays: bool
    kaggle: bool
    kaggle_ids: dict[str, str] = field(default_factory=dict)  # id -> ImageId (--id-map)


def kaggle_image_id(path: Path, fallback: str) -> str:
    """The SIIM-ACR ImageId: the DICOM's SOPInstanceUID, else ``fallback`` (the file stem)."""
    from ptxseg.data.imageio import dicom_meta, is_dicom

    if is_dicom(path):
        try:
            uid = dicom_meta(path)["SOPInstanceUID"]
        except DataError:
            uid = None
        if uid:
            return uid
    return fallback


def _write(fn, path: Path, *args, **kwargs) -> None:
    try:
        fn(path, *args, **kwargs)
    except OSError as exc:
        raise PtxsegError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _finish(item, probs: np.ndarray, post: _Post) -> ImageResult:
    """Native-size post-processing and the per-image files of one prediction (thread pool)."""
    from ptxseg.data.rle import encode
    from ptxseg.fileio import write_png
    from ptxseg.inference import probs_to_native

    h, w = item.height, item.width
    native = probs_to_native(probs, h, w)
    mask = binarize(native, post.params, area_scale=area_scale(post.params, h, w))
    area = int(np.count_nonzero(mask))
    _write(write_png, post.out / "masks" / f"{item.id}.png", mask * np.uint8(255))
    if post.overlays:
        overlay = draw_prediction(item.image, mask)
        path = post.out / "overlays" / f"{item.id}.png"
        _write(write_png, path, overlay, fast=True)
    result = ImageResult(
        id=item.id,
        source=item.path,
        height=h,
        width=w,
        has_pneumothorax=area > 0,
        area_px=area,
        area_fraction=area / float(h * w),
        max_prob=float(probs.max()),  # at model resolution, as evaluate's per_image.csv
    )
    if post.kaggle:
        fallback = post.kaggle_ids.get(item.id, item.id)
        result.kaggle_id = kaggle_image_id(Path(item.path), fallback)
        result.rle = encode(mask)
    return result


def _error_reason(item) -> str:
    message = item.error or "cannot read image"
    prefix = f"{item.path}: "
    return message.removeprefix(prefix)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class PredictSummary:
    out: Path
    n_images: int
    n_positive: int
    errors: list[tuple[str, str]]  # (source, reason)
    seconds: float  # the whole call, model loading included
    loop_seconds: float  # first read to last write
    backend: str
    thresholds_source: str
    notes: list[str]

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def images_per_s(self) -> float:
        """Throughput of the prediction loop (model loading excluded)."""
        return self.n_images / self.loop_seconds if self.loop_seconds > 0 else 0.0


def run_prediction(
    backend: Backend,
    inputs: Inputs,
    out: Path,
    params: PostParams,
    *,
    tta: str = "none",
    kaggle_csv: Path | None = None,
    kaggle_ids: dict[str, str] | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    writers: int | None = None,
    overlays: bool = True,
    progress: bool = True,
    console=None,
) -> tuple[list[tuple[str, str]], int, float]:
    """Predict every input with a loaded backend and write the outputs (see the module doc).

    Returns:
        ``(errors, n_positive, seconds)``: ``(source, reason)`` of each unreadable file, and the
        time from the first read to the last write (model loading excluded).
    """
    from rich.console import Console
    from rich.markup import escape

    from ptxseg.fileio import atomic_open
    from ptxseg.inference import check_tta, predict_probs

    check_tta(tta)
    console = console or Console(stderr=True)
    writers = writers or max(2, os.cpu_count() or 1)
    max_in_flight = 2 * batch_size + 2 * writers  # bounded: memory constant in len(inputs)
    post = _Post(params, Path(out), overlays, kaggle_csv is not None, kaggle_ids or {})
    entries = [(e.id, e.path) for e in inputs.entries]
    errors: list[tuple[str, str]] = []
    n_positive = 0

    with contextlib.ExitStack() as stack:
        res_fh = stack.enter_context(
            atomic_open(Path(out) / RESULTS_NAME, "w", newline="", encoding="utf-8")
        )
        kag_fh = (
            stack.enter_context(atomic_open(kaggle_csv, "w", newline="", encoding="utf-8"))
            if kaggle_csv is not None
            else None
        )
        pool = stack.enter_context(
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="ptxseg-write")
        )
        bar = stack.enter_context(progress_bar(enabled=progress, console=console, rate=True))
        results = csv.writer(res_fh, lineterminator="\n")
        results.writerow(RESULTS_COLUMNS)
        kaggle = csv.writer(kag_fh, lineterminator="\n") if kag_fh is not None else None
        if kaggle is not None:
            kaggle.writerow(KAGGLE_COLUMNS)
        task = bar.add_task("predicting", total=len(entries), rate="")
        pending: deque[Future | ImageResult] = deque()
        t0 = time.perf_counter()
        done = 0

        def emit(result: ImageResult) -> None:
            nonlocal done, n_positive
            results.writerow(result.row())
            if result.ok:
                n_positive += int(bool(result.has_pneumothorax))
                if kaggle is not None:
                    kaggle.writerow([result.kaggle_id, result.rle])
            done += 1
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f} img/s")

        def drain(block_until: int) -> None:
            while pending and (
                len(pending) > block_until
                or isinstance(pending[0], ImageResult)
                or pending[0].done()
            ):
                head = pending.popleft()
                emit(head if isinstance(head, ImageResult) else head.result())

        for item, probs in predict_probs(
            backend.model,
            entries,
            backend.size,
            batch_size=batch_size,
            workers=workers,
            tta=tta,
            keep_image=overlays,
            pad_to_batch=backend.pad_to_batch,
        ):
            if probs is None:
                reason = _error_reason(item)
                errors.append((item.path, reason))
                bar.console.print(
                    f"[yellow]warning:[/] {escape(one_line(f'{item.path}: {reason}'))}",
                    highlight=False,
                    soft_wrap=True,
                )
                pending.append(ImageResult(item.id, item.path, status=f"error: {reason}"))
            else:
                pending.append(pool.submit(_finish, item, probs, post))
            drain(max_in_flight)
        drain(0)
        seconds = time.perf_counter() - t0
    return errors, n_positive, seconds


def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    thresholds: str | Path | None = None,
    tta: str = "none",
    kaggle_csv: str | Path | None = None,
    id_maps: Sequence[str | Path] = (),
    backend: str = "torch",
    model_path: str | Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    overlays: bool = True,
    device: str = "auto",
    compile: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console=None,
) -> PredictSummary:
    """Predict masks for ``inputs`` with the model of ``run`` and write them under ``out``.

    Args:
        run: a run folder (``config.yaml`` + ``best.ckpt``, ``thresholds.json`` when tuned;
            ``model.onnx`` for the onnx backend).
        inputs: image files and folders (see the module doc).
        out: output folder (created; a previous predict's outputs in it are replaced).
        thresholds: a thresholds.json to use instead of ``RUN/thresholds.json``.
        tta: ``none`` or ``hflip`` (average with the mirrored image).
        kaggle_csv: also write a SIIM-ACR submission CSV here.
        id_maps: SIIM ``stage_1_*_images.csv`` files giving the submission's ImageId of each
            PNG (``new_filename`` -> ``ImageId``); needs ``kaggle_csv``.
        backend: ``torch`` or ``onnx``.
        model_path: checkpoint (torch) or ONNX file (onnx) instead of the run's own.
        batch_size: images per forward pass (default 32 on CUDA, 4 on the CPU).
        workers: image-reading processes (default: one per core, up to 8; 0 = in-process).
        overlays: also write overlays/<id>.png.
        device: ``auto``, ``cpu`` or ``cuda``.
        compile: ``torch.compile`` the model (``None``: on CUDA for large folders).
        overwrite: replace existing files that no previous predict wrote (see the module doc).

    Returns:
        A :class:`PredictSummary`; unreadable files are in ``errors`` (the CLI exits 2).

    Raises:
        PtxsegError: missing inputs, an output path that cannot be written or would replace
            an input or someone else's file, an output folder in use by another predict,
            unusable run folder, checkpoint, model or thresholds file (before anything is
            written).
    """
    from rich.console import Console

    from ptxseg.inference import check_tta

    t0 = time.perf_counter()
    console = console or Console(stderr=True)
    run, out = Path(run), Path(out)
    kaggle = Path(kaggle_csv) if kaggle_csv else None
    check_tta(tta)
    if backend not in BACKENDS:
        raise PtxsegError(f"--backend: unknown '{backend}' (valid: {', '.join(BACKENDS)})")
    if batch_size is not None and batch_size < 1:
        raise PtxsegError(f"--batch-size: must be at least 1 (got {batch_size})")
    if id_maps and kaggle is None:
        raise PtxsegError("--id-map: gives the ImageIds of --kaggle-csv; pass --kaggle-csv too")
    collected = collect_inputs(inputs, exclude=[out])
    ids = [e.id for e in collected.entries]
    kaggle_ids = mapped_kaggle_ids(collected.entries, id_maps) if id_maps else {}
    # what the command reads: never overwritten
    read_files = [e.path for e in collected.entries] + [Path(m) for m in id_maps]
    read_files += [Path(p) for p in inputs if Path(p).is_file()]  # manifests
    read_files += [Path(thresholds) if thresholds else run / "thresholds.json"]
    if backend == "onnx":
        read_files.append(Path(model_path) if model_path else run / "model.onnx")
    else:
        read_files += [run / "config.yaml", Path(model_path) if model_path else run / "best.ckpt"]
    plan = plan_outputs(
        out,
        kaggle,
        read_files=read_files,
        read_dirs=[Path(p) for p in inputs if Path(p).is_dir()],
        ids=ids,
        overlays=overlays,
        overwrite=overwrite,
    )
    created = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PtxsegError(f"{out}: cannot create --out ({exc.strerror or exc})") from None
    try:
        with output_lock(out):
            previous = previous_outputs(out)
            check_existing(plan, previous, ids, overlays)
            return _predict_locked(
                run, collected, plan, previous, t0=t0, thresholds=thresholds, tta=tta,
                kaggle_ids=kaggle_ids, backend=backend, model_path=model_path,
                batch_size=batch_size, workers=workers, overlays=overlays, device=device,
                compile=compile, progress=progress, console=console,
            )  # fmt: skip
    except BaseException:
        for path in created:  # a new --out that holds nothing yet is removed again
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _predict_locked(
    run: Path,
    collected: Inputs,
    plan: OutputPlan,
    previous: Previous | None,
    *,
    t0: float,
    thresholds,
    tta: str,
    kaggle_ids: dict[str, str],
    backend: str,
    model_path,
    batch_size: int | None,
    workers: int | None,
    overlays: bool,
    device: str,
    compile: bool | None,
    progress: bool,
    console,
) -> PredictSummary:
    """:func:`predict` once its outputs are checked and ``plan.out`` is locked."""
    from rich.markup import escape

    from ptxseg import __version__
    from ptxseg.fileio import write_json

    out = plan.out
    params, source = resolve_thresholds(run, Path(thresholds) if thresholds else None)
    model = open_backend(
        run,
        backend,
        model_path=Path(model_path) if model_path else None,
        device=device,
        compile=compile,
        n_images=len(collected.entries),
    )
    if source != "default":  # a file without "size": its areas are at model resolution
        params = with_model_size(params, model.size)
    for note in collected.notes:
        console.print(f"note: {one_line(note)}", highlight=False, markup=False, soft_wrap=True)
    if source == "default":
        console.print(
            f"[yellow]warning:[/] {escape(one_line(default_rule_warning(run)))}",
            highlight=False,
            soft_wrap=True,
        )
    if batch_size is None:
        on_cuda = model.name == "torch" and next(model.model.parameters()).device.type == "cuda"
        batch_size = 32 if on_cuda else 4
    ids = [e.id for e in collected.entries]
    record: dict[str, Any] = {
        "ptxseg_version": __version__,
        "run": printable(run),
        "backend": printable(model.description),
        "input_size": model.size,
        "tta": tta,
        "batch_size": batch_size,
        "thresholds": params.to_dict(),
        "thresholds_source": printable(source),
    }
    # the folder holds this run's outputs only: the previous predict's go first, and the ids
    # are recorded before any mask is written, so an interrupted run is cleared by the next
    clear_previous(previous)
    write_json(out / PREDICT_JSON, {**record, "status": "running", "overlays": overlays,
                                    "ids": ids})  # fmt: skip
    errors, n_positive, loop_seconds = run_prediction(
        model,
        collected,
        out,
        params,
        tta=tta,
        kaggle_csv=plan.kaggle_csv,
        kaggle_ids=kaggle_ids,
        batch_size=batch_size,
        workers=workers,
        overlays=overlays,
        progress=progress,
        console=console,
    )
    seconds = time.perf_counter() - t0
    summary = PredictSummary(
        out=out,
        n_images=len(collected.entries),
        n_positive=n_positive,
        errors=errors,
        seconds=seconds,
        loop_seconds=loop_seconds,
        backend=model.description,
        thresholds_source=source,
        notes=collected.notes,
    )
    write_json(
        out / PREDICT_JSON,
        {
            **record,
            "status": "done",
            "images": summary.n_images,
            "positive": n_positive,
            "errors": summary.n_errors,
            "seconds": round(seconds, 3),
            "images_per_s": round(summary.images_per_s, 3),
            "overlays": overlays,
            "ids": ids,
        },
    )
    return summary
