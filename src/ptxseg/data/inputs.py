"""What ``ptxseg predict`` reads: INPUT arguments -> image entries with unique, file-safe ids.

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
    The file stem (a dataset's record id for layout folders), made file-safe by the one rule
    of :func:`ptxseg.data.ids.safe_id` (a byte of the name that is not UTF-8 becomes ``_xff``:
    ``bad\\xff.png`` -> ``bad_xff``). Ids that collide (case-insensitively, so the output also
    works on macOS/Windows disks) keep the first one in input order (arguments in the order
    given, folders sorted) and the later ones get ``__2``, ``__3``... The same file named twice
    is predicted once.

What was skipped or how a folder was read comes back as notes (:attr:`Inputs.notes`), for the
caller to show.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ptxseg.data.ids import safe_id
from ptxseg.data.imageio import IMAGE_SUFFIXES, is_dicom
from ptxseg.data.sources import Layout, detect_layout, scan
from ptxseg.errors import DataError
from ptxseg.fileio import resolved


@dataclass(frozen=True)
class InputEntry:
    """One image to predict: its output id and its file."""

    id: str
    path: Path


@dataclass
class Inputs:
    """The entries to predict, the notes for the user, and the arguments they came from."""

    entries: list[InputEntry]
    notes: list[str] = field(default_factory=list)  # what was skipped or how folders were read
    sources: list[Path] = field(default_factory=list)  # the INPUT arguments


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
    try:
        layout = detect_layout(folder)
    except DataError:
        return None
    if layout is Layout.SIIM:
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
        image = (layout is Layout.PNG and path.parent.name == "png_images") or (
            layout is Layout.PTX498 and ".1.img." in path.name.lower()
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
    return Inputs(unique_ids(unique), notes, [Path(p) for p in inputs])
