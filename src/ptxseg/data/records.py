"""The one type that crosses from the dataset layouts to the rest of the pipeline
(:class:`Record`), and what a layout reports about files it cannot use (:class:`Problem`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ptxseg.errors import DataError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, naming the file."""

    path: str
    problem: str
    kind: str = "error"  # short category for inspect: unreadable, missing-mask, ...
    fatal: bool = True  # False: reported by inspect, but load_records still succeeds

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"



@dataclass(frozen=True)
class RleMask:
    """A mask given as SIIM run-length rows (one per lesion, OR-ed); empty tuple = no lesion.

    Args:
        rles: the ``EncodedPixels`` rows.
        source: the CSV they came from; ``lines``: each row's line in it; ``image_id``: their
            ImageId (all three name a row that cannot be decoded).
    """

    rles: tuple[str, ...]
    source: str = ""
    lines: tuple[int, ...] = ()
    image_id: str = ""


@dataclass(frozen=True)
class Record:
    """One radiograph and (optionally) its ground truth.

    Args:
        id: unique id within the dataset (file stem, SOPInstanceUID, ``SiteA_3``...).
        image: path of the image file (PNG, JPEG or DICOM).
        mask: a PNG mask path, an :class:`RleMask`, or ``None`` when no ground truth exists.
        has_pneumothorax: the label, ``None`` when unknown (no ground truth).
        patient_id: patient identifier where known (DICOM header), used to group the split.
    """

    id: str
    image: Path
    mask: Path | RleMask | None = None
    has_pneumothorax: bool | None = None
    patient_id: str | None = None


def require_ground_truth(records: Sequence[Record], source: str | Path | None, why: str) -> None:
    """Raise a :class:`DataError` naming how many records lack a mask (and one of them)."""
    missing = [r.id for r in records if r.mask is None]
    if missing:
        raise DataError(
            source,
            f"{len(missing)} record(s) have no ground-truth mask (e.g. '{missing[0]}'); {why}",
        )
