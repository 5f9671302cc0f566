"""Dataset layouts on disk -> a sorted list of :class:`~ptxseg.data.records.Record`.

Layouts (``layout=`` / ``--layout``):

``png``
    ``png_images/NAME`` + ``png_masks/NAME`` matched by file name (a mask may also be the same
    stem with ``.png``). Record id = file stem. The layout of the paper and of the common SIIM
    PNG re-packaging.
``siim``
    The SIIM-ACR challenge layout: ``.dcm`` files at any depth + one run-length CSV
    (:mod:`ptxseg.data.siim`); an ``rle`` (``--rle FILE``, config ``data.rle``) with layout
    ``auto`` means ``siim``. Record id = the DICOM SOPInstanceUID.
``ptx498``
    The PTX-498 release: ``Site*/{n}.1.img.png`` + ``{n}.2.mask.png`` (``.3.merge.png``
    overlays and ``.nii.gz`` copies are ignored). Record id = ``{site}_{n}`` (filename-safe).
``csv``
    A manifest CSV with columns ``image,mask`` (paths relative to the CSV; an empty mask cell =
    no ground truth) and optional ``id`` (default: the image stem; not a path:
    :func:`ptxseg.data.ids.is_path_like`) and ``patient_id``. ``root`` may be the CSV itself or
    a folder holding exactly one such CSV.

    Paths outside the manifest's folder are allowed: a relative cell is joined to the CSV's
    folder as written (``..`` included) and an absolute cell is used as is, so a manifest can
    list images kept anywhere the user can read (a manifest is trusted like a path typed on the
    command line; files are only ever read, never written or executed). Cells are file names,
    nothing else: ``~``, ``$VAR``, ``%VAR%``, globs and shell syntax are literal characters,
    never expanded, and no shell is run (docs/reliability.md).

``auto`` checks in that order: ``png_images/`` + ``manifest.csv`` (what ``ptxseg prepare``
writes) -> csv, so a prepared copy keeps the original ids and patient ids; ``png_images/`` ->
png; ``Site*/*.1.img.png`` -> ptx498; ``*.dcm`` anywhere -> siim; a manifest CSV -> csv. A
folder holding several (like the SIIM sample, which has png_images/ next to dicom/ and rle/)
is read as the first match; pass the layout explicitly to read another.

Labels (``has_pneumothorax``) come from the masks themselves (a mask with any foreground
pixel); mask files are read for that. Nothing is dropped silently: an image without its mask
is an error, and so are duplicate ids. ``scan`` returns every problem instead of raising, for
``ptxseg inspect``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptxseg.choices import Choice
from ptxseg.data.ids import is_path_like
from ptxseg.data.imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES, read_mask_raw
from ptxseg.data.records import Problem, Record
from ptxseg.data.siim import scan_siim
from ptxseg.errors import DataError, printable
from ptxseg.fileio import csv_header, irregular_problem, not_regular, read_csv_lines


class Layout(Choice):
    """A dataset layout (``--layout``, ``data.layout``); ``auto`` detects it."""

    AUTO = "auto"
    PNG = "png"
    SIIM = "siim"
    PTX498 = "ptx498"
    CSV = "csv"


RASTER_SUFFIXES = IMAGE_SUFFIXES - DICOM_SUFFIXES
_PTX_IMG = re.compile(r"^(\d+)\.1\.img\.png$", re.IGNORECASE)
_PTX_MASK = re.compile(r"^(\d+)\.2\.mask\.png$", re.IGNORECASE)


@dataclass
class Scan:
    """What :func:`scan` found: the records, the layout used and every problem."""

    records: list[Record]
    layout: Layout
    detected: bool
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user should know (not wrong)


# ----------------------------------------------------------------------------- labels


def _label_of(mask: Path) -> bool:
    return bool(read_mask_raw(mask).any())


def _with_labels(records: list[Record], problems: list[Problem]) -> list[Record]:
    """Fill ``has_pneumothorax`` from the mask files (read in a few threads)."""

    def label(rec: Record) -> tuple[Record, Problem | None]:
        if not (isinstance(rec.mask, Path) and _is_file(rec.mask)):
            return rec, None
        try:
            return replace(rec, has_pneumothorax=_label_of(rec.mask)), None
        except DataError as exc:
            problem = Problem(str(rec.mask), exc.problem, "unreadable")
            return replace(rec, has_pneumothorax=None), problem

    with ThreadPoolExecutor(max_workers=4) as pool:
        labelled = list(pool.map(label, records))
    problems.extend(p for _, p in labelled if p is not None)  # in record order
    return [rec for rec, _ in labelled]


def _check_duplicates(records: list[Record], problems: list[Problem]) -> None:
    seen: dict[str, Record] = {}
    for rec in records:
        if rec.id in seen:
            problems.append(
                Problem(
                    str(rec.image),
                    f"duplicate id '{rec.id}' (also {seen[rec.id].image})",
                    "duplicate-id",
                )
            )
        else:
            seen[rec.id] = rec


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS refuses (too long...) instead of OSError:
    manifest cells are data, not trusted paths."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _files(folder: Path, suffixes: Iterable[str], problems: list[Problem]) -> list[Path]:
    """The regular files of ``folder`` with one of ``suffixes`` (hidden ones skipped); others
    of those names (a FIFO, a symlink loop, a broken link...) are problems, kind ``irregular``."""
    suffixes = set(suffixes)
    found = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in suffixes or p.name.startswith("."):
            continue
        kind = not_regular(p)
        if kind is None:
            found.append(p)
        elif kind != "a folder":
            problems.append(Problem(str(p), irregular_problem(kind), "irregular"))
    return found


# ----------------------------------------------------------------------------- layouts


def _scan_png(root: Path, problems: list[Problem]) -> list[Record]:
    img_dir, mask_dir = root / "png_images", root / "png_masks"
    if not img_dir.is_dir():
        raise DataError(root, "png layout needs a png_images/ folder")
    images = _files(img_dir, RASTER_SUFFIXES, problems)
    if not images:
        raise DataError(img_dir, "no images found (expected .png/.jpg/.tif files)")
    masks = _files(mask_dir, RASTER_SUFFIXES, problems) if mask_dir.is_dir() else []
    by_name = {m.name: m for m in masks}
    by_stem = {m.stem: m for m in masks if m.suffix.lower() == ".png"}
    used: set[Path] = set()
    records = []
    for img in images:
        mask = by_name.get(img.name) or by_stem.get(img.stem)
        if mask is None:
            problems.append(
                Problem(str(img), f"image without mask (no {mask_dir / img.name})", "missing-mask")
            )
        else:
            used.add(mask)
        records.append(Record(id=printable(img.stem), image=img, mask=mask))
    for m in masks:
        if m not in used:
            problems.append(
                Problem(str(m), f"mask without image (no {img_dir / m.name})", "missing-image")
            )
    return records


def _scan_ptx498(root: Path, problems: list[Problem]) -> list[Record]:
    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("site"))
    if not sites:
        raise DataError(root, "ptx498 layout needs Site*/ folders")
    records = []
    for site in sites:
        images, masks = {}, {}  # case number -> path
        for p in _files(site, {".png"}, problems):
            if m := _PTX_IMG.match(p.name):
                images[m.group(1)] = p
            elif m := _PTX_MASK.match(p.name):
                masks[m.group(1)] = p
        for n, mask in masks.items():
            if n not in images:
                problems.append(Problem(str(mask), "mask without image", "missing-image"))
        for n in sorted(images, key=int):
            mask = masks.get(n)
            if mask is None:
                problems.append(
                    Problem(str(images[n]), f"image without mask (no {n}.2.mask.png)",
                            "missing-mask")
                )
            records.append(Record(printable(f"{site.name}_{n}"), images[n], mask))
    if not records:
        raise DataError(root, "no PTX-498 cases found (expected Site*/{n}.1.img.png)")
    return records


def is_manifest(header: list[str]) -> bool:
    return "image" in header and "mask" in header


def find_manifest(root: Path) -> Path:
    """The manifest CSV of a csv-layout dataset: ``root`` itself, a prepared copy's
    ``manifest.csv``, or the one CSV of ``root`` with the columns ``image,mask``."""
    if root.is_file():
        return root
    prepared = root / "manifest.csv"  # a `ptxseg prepare` copy (png_images/ + manifest.csv)
    if (root / "png_images").is_dir() and prepared.is_file() and is_manifest(
        csv_header(prepared)
    ):
        return prepared
    found = [p for p in sorted(root.glob("*.csv")) if is_manifest(csv_header(p))]
    if len(found) != 1:
        what = "no" if not found else "several"
        raise DataError(root, f"{what} manifest CSV with columns image,mask found")
    return found[0]


def _scan_csv(root: Path, problems: list[Problem]) -> list[Record]:
    path = find_manifest(root)
    header, rows, lines = read_csv_lines(path)
    if not is_manifest(header):
        raise DataError(path, f"expected columns image,mask, found {','.join(header) or 'none'}")
    if not rows:
        raise DataError(path, "manifest has no rows")
    base = path.parent
    records = []
    for i, row in zip(lines, rows, strict=True):
        if not row["image"]:
            raise DataError(path, f"line {i}: empty image cell")
        img = base / row["image"]
        mask = base / row["mask"] if row["mask"] else None
        for what, file in (("image", img), ("mask", mask)):
            if file is not None and not _is_file(file):
                kind = not_regular(file)
                irregular = kind is not None and kind.startswith("a ")  # a FIFO, a folder...
                problem = irregular_problem(kind) if irregular else f"{what} not found"
                problems.append(Problem(str(file), f"{problem} (line {i} of {path})",
                                        "irregular" if irregular else "missing"))
        ident = row.get("id") or img.stem
        if is_path_like(ident):
            problems.append(
                Problem(str(path), f"line {i}: id '{ident}' is not filename-safe", "bad-id")
            )
        records.append(Record(ident, img, mask, None, row.get("patient_id") or None))
    return records


_SCANNERS = {Layout.PNG: _scan_png, Layout.PTX498: _scan_ptx498, Layout.CSV: _scan_csv}


# ----------------------------------------------------------------------------- detection


def detect_layout(root: str | Path) -> Layout:
    """Which layout a folder (or manifest CSV) is; DataError when none fits."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset not found")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return Layout.CSV
        raise DataError(root, "a dataset must be a folder or a manifest CSV")
    if (root / "png_images").is_dir():
        if (root / "manifest.csv").is_file() and is_manifest(csv_header(root / "manifest.csv")):
            return Layout.CSV  # a `ptxseg prepare` copy: its manifest keeps the original ids
        return Layout.PNG
    for site in root.iterdir():
        if site.is_dir() and site.name.lower().startswith("site"):
            if any(_PTX_IMG.match(p.name) for p in site.iterdir()):
                return Layout.PTX498
    if next((p for p in root.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES), None):
        return Layout.SIIM
    if any(is_manifest(csv_header(p)) for p in root.glob("*.csv")):
        return Layout.CSV
    if not any(root.iterdir()):
        raise DataError(root, "dataset folder is empty")
    raise DataError(
        root,
        "cannot tell the dataset layout: expected png_images/ + png_masks/, Site*/{n}.1.img.png,"
        " .dcm files + a run-length CSV, or a manifest CSV with columns image,mask",
    )


def scan(
    root: str | Path,
    layout: str | Layout = Layout.AUTO,
    *,
    labels: bool = True,
    rle: str | Path | None = None,
    unlabelled: bool = False,
) -> Scan:
    """List a dataset's records and every problem found, without raising for problems.

    Args:
        root: dataset folder (or manifest CSV).
        layout: a :class:`Layout` (``auto`` detects it).
        labels: read the mask files to fill ``has_pneumothorax`` (png, ptx498, csv).
        rle: the run-length CSV of a siim folder (``--rle``); implies ``siim`` for ``auto``.
        unlabelled: images without labels are fine (``ptxseg inspect``): a siim folder
            without its run-length CSV gives records without ground truth, and a note.

    Raises:
        DataError: missing/empty folder, undetectable layout, unusable CSV (nothing to list).
    """
    root = Path(root)
    layout = Layout.parse(layout, "--layout")
    if not root.exists():
        raise DataError(root, "dataset not found")
    if not (root.is_dir() or root.is_file()):  # a FIFO, /dev/stdin...: never read
        kind = not_regular(root)
        raise DataError(root, f"a dataset must be a folder or a manifest CSV, not {kind}")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(root, "dataset folder is empty")
    if rle is not None and layout not in (Layout.AUTO, Layout.SIIM):
        raise DataError(
            None, f"--rle / data.rle: a run-length CSV is for the siim layout, not '{layout}'"
        )
    detected = layout is Layout.AUTO and rle is None
    used = Layout.SIIM if rle is not None else detect_layout(root) if detected else layout
    problems: list[Problem] = []
    notes: list[str] = []
    if used is Layout.SIIM:
        records = scan_siim(root, problems, rle, notes if unlabelled else None)
    else:
        records = _SCANNERS[used](root, problems)
    records.sort(key=lambda r: r.id)
    _check_duplicates(records, problems)
    if labels:
        records = _with_labels(records, problems)
    return Scan(records, used, detected, problems, notes)


def load_records(
    root: str | Path, layout: str | Layout = Layout.AUTO, *, rle: str | Path | None = None
) -> tuple[list[Record], Layout]:
    """Read a dataset into records sorted by id, plus the layout used (detected if ``auto``);
    ``rle`` picks the run-length CSV of a siim folder (:func:`ptxseg.data.siim.find_rle_csv`).

    Raises:
        DataError: for the first problem found (image without mask, mask without image,
            duplicate id, unreadable mask/header, bad CSV...), naming the file; the message
            says how many more there are (``ptxseg inspect`` lists them all). Run-length rows
            of a siim CSV whose DICOM is absent are not an error (the official CSVs list
            the whole challenge set; a subset of the DICOMs is a normal download).
    """
    result = scan(root, layout, rle=rle)
    fatal = [p for p in result.problems if p.fatal]
    if fatal:
        first = fatal[0]
        more = len(fatal) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)}; see ptxseg inspect)" if more else ""
        raise DataError(first.path, first.problem + suffix)
    return result.records, result.layout
