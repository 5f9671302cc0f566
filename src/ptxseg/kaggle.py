"""The SIIM-ACR submission: each image's ``ImageId`` and the CSV's format.

``ImageId`` is a DICOM's SOPInstanceUID; a PNG of the common SIIM re-packaging gets it from
the ``stage_1_*_images.csv`` files (``new_filename,ImageId``) named with ``--id-map``, matched
by file name with or without its extension; anything else keeps its id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ptxseg.data.imageio import dicom_meta, is_dicom
from ptxseg.errors import DataError, PtxsegError
from ptxseg.fileio import not_regular, open_regular, read_csv_rows

if TYPE_CHECKING:
    from ptxseg.data.inputs import InputEntry

KAGGLE_COLUMNS = ("ImageId", "EncodedPixels")


def is_kaggle_csv(path: Path) -> bool:
    """Whether ``path`` is a regular file whose first line is exactly ``ImageId,EncodedPixels``
    (a submission written by ``--kaggle-csv``)."""
    try:
        with open_regular(path) as fh:
            head = fh.read(64)
    except (OSError, DataError):
        return False
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return first == ",".join(KAGGLE_COLUMNS).encode()


def kaggle_image_id(path: Path, fallback: str) -> str:
    """The SIIM-ACR ImageId: the DICOM's SOPInstanceUID, else ``fallback`` (the file stem)."""
    if is_dicom(path):
        try:
            uid = dicom_meta(path)["SOPInstanceUID"]
        except DataError:
            uid = None
        if uid:
            return uid
    return fallback


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
