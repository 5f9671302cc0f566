"""The SIIM-ACR layout: DICOM files at any depth plus one run-length CSV.

The CSV is ``stage_2_train.csv`` when present, then ``train-rle.csv``, else the only ``*.csv``
with the columns ``ImageId,EncodedPixels`` or ``fname,mask`` (leading spaces and a UTF-8 BOM
are fine); when a folder holds several, ``rle=`` (``--rle FILE``, config ``data.rle``; a
relative path is taken from the dataset folder) picks one. Record id = the DICOM
SOPInstanceUID (the CSV's ImageId); patient id = PatientID. ``-1`` means no lesion; several rows
for one image are OR-ed; an image absent from the CSV has no ground truth (mask ``None``). Each
run-length row keeps its CSV line number, so a row that cannot be decoded is named by file,
line and ImageId. Rows whose DICOM is absent are reported but not fatal (the official CSVs list
the whole challenge set; a subset of the DICOMs is a normal download).
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ptxseg.data.imageio import DICOM_SUFFIXES, dicom_meta
from ptxseg.data.records import Problem, Record, RleMask
from ptxseg.data.rle import is_empty
from ptxseg.errors import DataError, printable
from ptxseg.fileio import csv_header, read_csv_lines

RLE_COLUMNS = (("imageid", "encodedpixels"), ("fname", "mask"))
PREFERRED_RLE = ("stage_2_train.csv", "train-rle.csv")


def rle_columns(header: list[str]) -> tuple[str, str] | None:
    """The (id, run-length) column pair a CSV header has, if any."""
    for cols in RLE_COLUMNS:
        if all(c in header for c in cols):
            return cols
    return None


def find_rle_csv(root: Path, rle: str | Path | None = None) -> Path:
    """The run-length CSV of a siim folder (see the module doc).

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
        header = csv_header(path)
        if not rle_columns(header):
            raise DataError(
                path,
                "not a run-length CSV (--rle / data.rle): expected columns "
                f"ImageId,EncodedPixels or fname,mask, found {','.join(header) or 'none'}",
            )
        return path
    found = []
    for p in sorted(root.rglob("*.csv")):
        if rle_columns(csv_header(p)):
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
    cols = rle_columns(header)
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


def scan_siim(
    root: Path, problems: list[Problem], rle: str | Path | None = None,
    notes: list[str] | None = None,
) -> list[Record]:
    """The records of a siim folder. With ``notes`` (``ptxseg inspect``: images without
    labels are fine) a folder without a run-length CSV gives records without ground truth and
    a note says so; without, it is a :class:`DataError`."""
    dicoms = sorted(p for p in root.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES)
    if not dicoms:
        raise DataError(root, "siim layout needs .dcm files (none found)")
    try:
        csv_path: Path | None = find_rle_csv(root, rle)
    except DataError as exc:
        if notes is None or rle is not None or not exc.problem.startswith("no run-length CSV"):
            raise
        csv_path = None
        notes.append(f"{root}: no run-length CSV (columns ImageId,EncodedPixels or fname,mask):"
                     f" the {len(dicoms)} DICOMs are inspected without labels")  # fmt: skip
    rles = read_rle_rows(csv_path) if csv_path is not None else {}

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
