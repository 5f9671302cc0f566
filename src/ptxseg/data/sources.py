"""Dataset layouts on disk -> a sorted list of :class:`~ptxseg.data.records.Record`.

Layouts (``layout=`` / ``--layout``):

``png``
    ``png_images/NAME`` + ``png_masks/NAME`` matched by file name (a mask may also be the same
    stem with ``.png``). Record id = file stem. The layout of the paper and of the common SIIM
    PNG re-packaging.
``siim``
    The SIIM-ACR challenge layout: ``.dcm`` files at any depth + one run-length CSV
    (``stage_2_train.csv`` preferred, then ``train-rle.csv``, else the only ``*.csv`` with the
    columns ``ImageId,EncodedPixels`` or ``fname,mask``; leading spaces and a UTF-8 BOM are
    fine). When a folder holds several such CSVs, pick one with ``rle=`` (``--rle FILE``, config
    ``data.rle``; a relative path is taken from the dataset folder); an ``rle`` with layout
    ``auto`` means ``siim``. Record id = the DICOM SOPInstanceUID (the CSV's ImageId); patient
    id = PatientID. ``-1`` means no lesion; several rows for one image are OR-ed. An image
    absent from the CSV has no ground truth (mask ``None``). Each run-length row keeps its CSV
    line number, so a row that cannot be decoded is named by file, line and ImageId.
``ptx498``
    The PTX-498 release: ``Site*/{n}.1.img.png`` + ``{n}.2.mask.png`` (``.3.merge.png``
    overlays and ``.nii.gz`` copies are ignored). Record id = ``{site}_{n}`` (filename-safe).
``csv``
    A manifest CSV with columns ``image,mask`` (paths relative to the CSV; an empty mask cell =
    no ground truth) and optional ``id`` (default: the image stem; no slashes, since ids name
    output files) and ``patient_id``. ``root`` may be the CSV itself or a folder holding
    exactly one such CSV.

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

import csv
import io
import re
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptxseg.data.imageio import IMAGE_SUFFIXES, dicom_meta, read_mask_raw
from ptxseg.data.records import Record, RleMask
from ptxseg.data.rle import is_empty
from ptxseg.errors import DataError, printable
from ptxseg.fileio import irregular_problem, not_regular, open_regular, read_text

LAYOUTS = ("png", "siim", "ptx498", "csv")
RASTER_SUFFIXES = IMAGE_SUFFIXES - {".dcm", ".dicom"}
RLE_COLUMNS = (("imageid", "encodedpixels"), ("fname", "mask"))
PREFERRED_RLE = ("stage_2_train.csv", "train-rle.csv")
_PTX_IMG = re.compile(r"^(\d+)\.1\.img\.png$", re.IGNORECASE)
_PTX_MASK = re.compile(r"^(\d+)\.2\.mask\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, naming the file."""

    path: str
    problem: str
    kind: str = "error"  # short category for inspect: unreadable, missing-mask, ...
    fatal: bool = True  # False: reported by inspect, but load_records still succeeds

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Scan:
    """What :func:`scan` found: the records, the layout used and every problem."""

    records: list[Record]
    layout: str
    detected: bool
    problems: list[Problem] = field(default_factory=list)


# ----------------------------------------------------------------------------- CSV helpers


def _norm(name: str) -> str:
    return name.strip().lstrip("\ufeff").strip().lower()


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV (BOM and CRLF tolerated) -> (normalised column names, rows keyed by them).

    Column names are stripped and lower-cased; cell values are stripped; blank lines skipped.
    """
    header, rows, _lines = read_csv_lines(path)
    return header, rows


def read_csv_lines(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """:func:`read_csv_rows` plus the line of the file each row starts on (1 = the header's
    line; blank lines and quoted newlines counted as in a text editor)."""
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


def _rle_columns(header: list[str]) -> tuple[str, str] | None:
    for cols in RLE_COLUMNS:
        if all(c in header for c in cols):
            return cols
    return None


def _is_manifest(header: list[str]) -> bool:
    return "image" in header and "mask" in header


def _csv_header(path: Path) -> list[str]:
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline="") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error, DataError):
        return []
    return [_norm(c) for c in first]


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


def find_rle_csv(root: Path, rle: str | Path | None = None) -> Path:
    """The run-length CSV of a siim folder (see the module doc for the rules).

    Args:
        root: the dataset folder.
        rle: the CSV to use (``--rle FILE`` / ``data.rle``); relative paths are taken from
            ``root``. Without it the folder is searched.

    Raises:
        DataError: ``rle`` missing or without run-length columns; no CSV found; several found
            and none preferred (the message names ``--rle``).
    """
    if rle is not None:
        path = Path(rle)
        if not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise DataError(path, "run-length CSV not found (--rle / data.rle)")
        header = _csv_header(path)
        if not _rle_columns(header):
            raise DataError(
                path,
                "not a run-length CSV (--rle / data.rle): expected columns "
                f"ImageId,EncodedPixels or fname,mask, found {','.join(header) or 'none'}",
            )
        return path
    found = []
    for p in sorted(root.rglob("*.csv")):
        if _rle_columns(_csv_header(p)):
            found.append(p)
    if not found:
        raise DataError(
            root,
            "no run-length CSV found (a *.csv with columns ImageId,EncodedPixels or fname,mask)",
        )
    for name in PREFERRED_RLE:
        named = [p for p in found if p.name.lower() == name]
        if len(named) == 1:
            return named[0]
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found)
        raise DataError(
            root,
            f"several run-length CSVs found ({listed}); choose one with --rle FILE "
            "(config key data.rle)",
        )
    return found[0]


def read_rle_csv(path: Path) -> dict[str, list[str]]:
    """ImageId -> its run-length rows (``-1`` rows dropped; an id with only ``-1`` -> [])."""
    return {k: [rle for rle, _line in v] for k, v in read_rle_rows(path).items()}


def read_rle_rows(path: Path) -> dict[str, list[tuple[str, int]]]:
    """ImageId -> its run-length rows with their CSV line numbers (``-1`` rows dropped)."""
    header, rows, lines = read_csv_lines(path)
    cols = _rle_columns(header)
    if cols is None:
        raise DataError(
            path,
            f"expected columns ImageId,EncodedPixels (or fname,mask), found {','.join(header)}",
        )
    id_col, rle_col = cols
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for row, line in zip(rows, lines, strict=True):
        ident = row[id_col]
        if not ident:
            raise DataError(path, f"line {line}: empty {id_col}")
        rows_for_id = out[ident]
        if not is_empty(row[rle_col]):
            rows_for_id.append((row[rle_col], line))
    return dict(out)


def rle_csv_used(root: str | Path, layout: str, rle: str | Path | None = None) -> Path | None:
    """The run-length CSV that ``load_records(root, layout, rle=rle)`` reads (``None`` unless
    the layout is siim): what a run records in ``data.json`` so tune/evaluate find it again."""
    root = Path(root)
    if layout != "siim":
        return None
    return find_rle_csv(root, rle).resolve()


def _scan_siim(
    root: Path, problems: list[Problem], rle: str | Path | None = None
) -> list[Record]:
    dicoms = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".dcm", ".dicom"))
    if not dicoms:
        raise DataError(root, "siim layout needs .dcm files (none found)")
    csv_path = find_rle_csv(root, rle)
    rles = read_rle_rows(csv_path)

    def meta(p: Path):
        try:
            return dicom_meta(p), None
        except DataError as exc:
            return None, Problem(str(p), exc.problem, "unreadable")

    with ThreadPoolExecutor(max_workers=4) as pool:
        metas = list(pool.map(meta, dicoms))
    records, seen = [], set()
    for path, (info, problem) in zip(dicoms, metas, strict=True):
        if problem is not None:
            problems.append(problem)
            continue
        uid = info["SOPInstanceUID"] or printable(path.stem)
        key = uid if uid in rles else (path.stem if path.stem in rles else None)
        if key is None:
            mask, label = None, None
        else:
            seen.add(key)
            mask = RleMask(
                tuple(r for r, _ in rles[key]),
                source=str(csv_path),
                lines=tuple(line for _, line in rles[key]),
                image_id=key,
            )
            label = bool(rles[key])
        records.append(Record(uid, path, mask, label, info["PatientID"]))
    for ident in sorted(set(rles) - seen):
        problems.append(
            Problem(
                str(csv_path),
                f"run-length rows for '{ident}' but no DICOM",
                "missing-image",
                fatal=False,
            )
        )
    return records


def find_manifest(root: Path) -> Path:
    if root.is_file():
        return root
    prepared = root / "manifest.csv"  # a `ptxseg prepare` copy (png_images/ + manifest.csv)
    if (root / "png_images").is_dir() and prepared.is_file() and _is_manifest(
        _csv_header(prepared)
    ):
        return prepared
    found = [p for p in sorted(root.glob("*.csv")) if _is_manifest(_csv_header(p))]
    if len(found) != 1:
        what = "no" if not found else "several"
        raise DataError(root, f"{what} manifest CSV with columns image,mask found")
    return found[0]


def _scan_csv(root: Path, problems: list[Problem]) -> list[Record]:
    path = find_manifest(root)
    header, rows, lines = read_csv_lines(path)
    if not _is_manifest(header):
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
        if "/" in ident or "\\" in ident or ident in (".", ".."):
            problems.append(
                Problem(str(path), f"line {i}: id '{ident}' is not filename-safe", "bad-id")
            )
        records.append(Record(ident, img, mask, None, row.get("patient_id") or None))
    return records


_SCANNERS = {"png": _scan_png, "siim": _scan_siim, "ptx498": _scan_ptx498, "csv": _scan_csv}


# ----------------------------------------------------------------------------- detection


def detect_layout(root: str | Path) -> str:
    """Which layout a folder (or manifest CSV) is; DataError when none fits."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset not found")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DataError(root, "a dataset must be a folder or a manifest CSV")
    if (root / "png_images").is_dir():
        if (root / "manifest.csv").is_file() and _is_manifest(_csv_header(root / "manifest.csv")):
            return "csv"  # a `ptxseg prepare` copy: its manifest keeps the original ids
        return "png"
    for site in root.iterdir():
        if site.is_dir() and site.name.lower().startswith("site"):
            if any(_PTX_IMG.match(p.name) for p in site.iterdir()):
                return "ptx498"
    if next((p for p in root.rglob("*") if p.suffix.lower() in (".dcm", ".dicom")), None):
        return "siim"
    if any(_is_manifest(_csv_header(p)) for p in root.glob("*.csv")):
        return "csv"
    if not any(root.iterdir()):
        raise DataError(root, "dataset folder is empty")
    raise DataError(
        root,
        "cannot tell the dataset layout: expected png_images/ + png_masks/, Site*/{n}.1.img.png,"
        " .dcm files + a run-length CSV, or a manifest CSV with columns image,mask",
    )


def scan(
    root: str | Path,
    layout: str = "auto",
    *,
    labels: bool = True,
    rle: str | Path | None = None,
) -> Scan:
    """List a dataset's records and every problem found, without raising for problems.

    Args:
        root: dataset folder (or manifest CSV).
        layout: ``auto`` or one of ``png, siim, ptx498, csv``.
        labels: read the mask files to fill ``has_pneumothorax`` (png, ptx498, csv).
        rle: the run-length CSV of a siim folder (``--rle``); implies ``siim`` for ``auto``.

    Raises:
        DataError: missing/empty folder, undetectable layout, unusable CSV (nothing to list).
    """
    root = Path(root)
    if layout not in ("auto", *LAYOUTS):
        raise DataError(None, f"unknown layout '{layout}' (choose from auto, {', '.join(LAYOUTS)})")
    if not root.exists():
        raise DataError(root, "dataset not found")
    if not (root.is_dir() or root.is_file()):  # a FIFO, /dev/stdin...: never read
        kind = not_regular(root)
        raise DataError(root, f"a dataset must be a folder or a manifest CSV, not {kind}")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(root, "dataset folder is empty")
    if rle is not None and layout not in ("auto", "siim"):
        raise DataError(
            None, f"--rle / data.rle: a run-length CSV is for the siim layout, not '{layout}'"
        )
    detected = layout == "auto" and rle is None
    used = "siim" if rle is not None else detect_layout(root) if detected else layout
    problems: list[Problem] = []
    if used == "siim":
        records = _scan_siim(root, problems, rle)
    else:
        records = _SCANNERS[used](root, problems)
    records.sort(key=lambda r: r.id)
    _check_duplicates(records, problems)
    if labels:
        records = _with_labels(records, problems)
    return Scan(records, used, detected, problems)


def load_records(
    root: str | Path, layout: str = "auto", *, rle: str | Path | None = None
) -> tuple[list[Record], str]:
    """Read a dataset into records sorted by id, plus the layout used (detected if ``auto``);
    ``rle`` picks the run-length CSV of a siim folder (see :func:`find_rle_csv`).

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
