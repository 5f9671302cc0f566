"""``ptxseg inspect``: what a dataset holds and everything wrong with it.

Every image is decoded (so truncated files are found) and every mask is read (labels, areas,
non-binary values, size mismatches); files are processed in a few threads. Problems never
stop the inspection: each is collected with its file. Images without labels are inspected
too (DICOMs without their run-length CSV: new images to check before predicting), and the
notes say what else the folder holds that another layout would read (:func:`other_contents`:
the SIIM sample's 12 DICOMs and 2 run-length CSVs beside its png layout).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ptxseg.data.imageio import (
    probe_image,
    read_image,
    read_mask,
    read_mask_raw,
    size_mismatch,
)
from ptxseg.data.records import Problem, Record, RleMask
from ptxseg.data.sources import scan
from ptxseg.errors import DataError
from ptxseg.progress import plural

#: masks read to check that they are binary before training (a sample: labels already read
#: every mask once, and a full second pass would double the start-up time on large sets)
MASK_SAMPLE = 64


@dataclass
class _Checked:
    size: str | None = None  # "WxH"
    bit_depth: int | None = None
    channels: int | None = None
    format: str | None = None
    label: bool | None = None
    area: int | None = None
    pixels: int | None = None
    problems: list[Problem] = field(default_factory=list)


@dataclass
class InspectReport:
    """Counts, image properties, mask statistics and problems of one dataset."""

    root: str
    layout: str
    detected: bool
    images: int
    pairs: int
    positive: int
    negative: int
    no_ground_truth: int
    image_sizes: dict[str, int]
    bit_depths: dict[str, int]
    channels: dict[str, int]
    formats: dict[str, int]
    mask_area: dict[str, float | int | None]
    problems: list[Problem]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "layout": self.layout,
            "layout_detected": self.detected,
            "images": self.images,
            "pairs": self.pairs,
            "positive": self.positive,
            "negative": self.negative,
            "no_ground_truth": self.no_ground_truth,
            "image_sizes": self.image_sizes,
            "bit_depths": self.bit_depths,
            "channels": self.channels,
            "formats": self.formats,
            "mask_area": self.mask_area,
            "problems": [
                {"path": p.path, "kind": p.kind, "problem": p.problem} for p in self.problems
            ],
            "notes": list(self.notes),
        }


def _check_mask_file(path: Path, shape: tuple[int, int], out: _Checked) -> np.ndarray | None:
    raw = read_mask_raw(path)
    values = np.unique(raw)
    nonzero = values[values != 0]
    if nonzero.size > 1:
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if values.size > 6 else "")
        out.problems.append(
            Problem(str(path), f"non-binary mask ({values.size} values: {shown})", "non-binary")
        )
    if raw.shape != shape:
        out.problems.append(Problem(str(path), size_mismatch(raw.shape, shape), "size-mismatch"))
        return None
    return (raw > 0).astype(np.uint8)


def _check(rec: Record, reported: frozenset[str] = frozenset()) -> _Checked:
    out = _Checked()
    if str(rec.image) in reported:  # missing, a FIFO...: the scan said so already
        return out
    try:
        info = probe_image(rec.image)
        out.bit_depth, out.channels, out.format = info.bit_depth, info.channels, info.format
        shape = read_image(rec.image).shape
        out.size = f"{shape[1]}x{shape[0]}"
    except DataError as exc:
        out.problems.append(Problem(str(rec.image), exc.problem, "unreadable"))
        return out
    if rec.mask is None:
        return out
    try:
        if isinstance(rec.mask, RleMask):
            mask = read_mask(rec.mask, shape)
        else:
            mask = _check_mask_file(rec.mask, shape, out)
    except DataError as exc:
        path = exc.path or (rec.mask.source if isinstance(rec.mask, RleMask) else str(rec.mask))
        out.problems.append(Problem(path, exc.problem, "unreadable-mask"))
        return out
    if mask is not None:
        out.area = int(mask.sum())
        out.pixels = int(mask.size)
        out.label = out.area > 0
    return out


def _area_stats(areas: list[int], fractions: list[float]) -> dict[str, float | int | None]:
    if not areas:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None,
                "mean_fraction": None}
    a = np.asarray(areas, dtype=np.float64)
    return {
        "count": len(areas),
        "min": int(a.min()),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "max": int(a.max()),
        "mean_fraction": float(np.mean(fractions)),
    }


def _count(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(v for v in values if v is not None).items())}


def inspect_dataset(
    root: str | Path,
    layout: str = "auto",
    *,
    workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    rle: str | Path | None = None,
) -> InspectReport:
    """Read every image and mask of a dataset and report counts, properties and problems.

    Args:
        root: dataset folder (or manifest CSV).
        layout: ``auto`` or a layout name (see :mod:`ptxseg.data.sources`).
        workers: reading threads.
        on_progress: called with (done, total) after each record.
        rle: the run-length CSV of a siim folder (``--rle``).

    Raises:
        DataError: only when the dataset cannot be listed at all (missing/empty folder,
            unknown layout, unusable CSV); everything else is a reported problem.
    """
    found = scan(root, layout, labels=False, rle=rle, unlabelled=True)
    records = found.records
    problems = list(found.problems)
    reported = frozenset(p.path for p in problems if p.kind in ("missing", "irregular"))
    checked: list[_Checked] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, result in enumerate(pool.map(partial(_check, reported=reported), records), 1):
            checked.append(result)
            if on_progress:
                on_progress(i, len(records))
    for c in checked:
        problems.extend(c.problems)
    labels = [c.label for c in checked]
    pos = [c for c in checked if c.label]
    return InspectReport(
        root=str(root),
        layout=found.layout,
        detected=found.detected,
        images=len(records),
        pairs=sum(r.mask is not None for r in records),
        positive=sum(v is True for v in labels),
        negative=sum(v is False for v in labels),
        no_ground_truth=sum(r.mask is None for r in records),
        image_sizes=_count(c.size for c in checked),
        bit_depths=_count(c.bit_depth for c in checked),
        channels=_count(c.channels for c in checked),
        formats=_count(c.format for c in checked),
        mask_area=_area_stats([c.area for c in pos], [c.area / c.pixels for c in pos]),
        problems=problems,
        notes=[*found.notes, *other_contents(root, found.layout)],
    )


def _where(root: Path, paths: Sequence[Path], limit: int = 3) -> str:
    """``dicom/`` or ``rle/a.csv, rle/b.csv``: the folders holding ``paths`` (several files),
    or the files themselves (a few), relative to ``root``."""
    rel = [p.relative_to(root).as_posix() for p in paths]
    if len(rel) <= 2:
        return ", ".join(rel)
    folders = sorted({r.rsplit("/", 1)[0] + "/" if "/" in r else "./" for r in rel})
    return ", ".join(folders[:limit]) + (f" and {len(folders) - limit} more" if len(
        folders) > limit else "")  # fmt: skip


def other_contents(root: str | Path, used: str) -> list[str]:
    """What else a dataset folder holds that the ``used`` layout does not read, and how to
    read it: DICOMs and run-length CSVs (``--layout siim``, ``--rle FILE``), a png layout's
    ``png_images/`` (``--layout png``), ``Site*/`` folders (``--layout ptx498``), manifest
    CSVs (``--layout csv``). One note, or none."""
    from ptxseg.data.imageio import DICOM_SUFFIXES
    from ptxseg.data.siim import rle_columns
    from ptxseg.data.sources import RASTER_SUFFIXES, is_manifest
    from ptxseg.fileio import csv_header

    root = Path(root)
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*") if not p.name.startswith(".") and p.is_file())
    found: list[tuple[str, str]] = []  # (what, option)
    if used != "siim":
        dicoms = [p for p in files if p.suffix.lower() in DICOM_SUFFIXES]
        csvs = [p for p in files if p.suffix.lower() == ".csv"]
        rles = [p for p in csvs if rle_columns(csv_header(p))]
        if dicoms:
            found.append((f"{plural(len(dicoms), 'DICOM')} ({_where(root, dicoms)})",
                          "--layout siim"))  # fmt: skip
        if rles:
            found.append((f"{plural(len(rles), 'run-length CSV')} ({_where(root, rles)})",
                          "--rle FILE" if dicoms else "--layout siim"))  # fmt: skip
    if used not in ("png", "csv") and (root / "png_images").is_dir():
        images = [p for p in files if p.parent == root / "png_images"
                  and p.suffix.lower() in RASTER_SUFFIXES]  # fmt: skip
        found.append((f"a png layout (png_images/, {plural(len(images), 'image')})",
                      "--layout png"))  # fmt: skip
    if used != "ptx498":
        sites = [p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("site")]
        if sites:
            found.append((f"{plural(len(sites), 'Site*/ folder')}", "--layout ptx498"))
    if used != "csv":
        manifests = [p for p in root.glob("*.csv") if is_manifest(csv_header(p))]
        if manifests:
            found.append((f"{plural(len(manifests), 'manifest CSV')} "
                          f"({_where(root, manifests)})", "--layout csv"))  # fmt: skip
    if not found:
        return []
    what = ", ".join(w for w, _ in found[:-1]) + (" and " if len(found) > 1 else "") + found[-1][0]
    options = " ".join(dict.fromkeys(o for _, o in found))
    return [f"{root} also holds {what}, which the {used} layout does not read: inspect them "
            f"with {options}"]  # fmt: skip


def non_binary_masks(
    records: Sequence[Record], limit: int = MASK_SAMPLE
) -> tuple[list[Path], int, int]:
    """Mask files (of an evenly spaced sample of at most ``limit``) with more than one
    non-zero value: the test ``ptxseg inspect`` applies to every mask. Run-length masks are
    binary by construction and not read. Returns (bad files, masks read, mask files)."""
    masks = [r.mask for r in records if isinstance(r.mask, Path)]
    sample = masks
    if len(masks) > limit:
        sample = [masks[i * len(masks) // limit] for i in range(limit)]
    bad = []
    for path in sample:
        try:
            raw = read_mask_raw(path)
        except DataError:
            continue  # unreadable masks are reported when they are loaded
        nonzero = raw[raw != 0]
        if nonzero.size and (nonzero != nonzero.flat[0]).any():
            bad.append(path)
    return bad, len(sample), len(masks)
