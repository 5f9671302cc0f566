"""Lesion measures of one predicted mask: area (pixels, cm²), side (patient's left/right), max
probability.

**Area.** ``area_px`` counts the mask's pixels at the resolution it is given in (predict's
masks are at the image's native size). ``area_cm2`` needs the DICOM's pixel spacing:
``PixelSpacing`` (0028,0030) when present (spacing in the patient, calibrated), else
``ImagerPixelSpacing`` (0018,1164) (spacing at the detector, which includes the X-ray
geometric magnification, divided by ``EstimatedRadiographicMagnificationFactor`` (0018,1114)
where the header has one). Both are ``[row spacing, column spacing]`` in mm for the image's
``Rows`` x ``Columns``; a mask of another size is scaled (each mask pixel covers
``Rows / mask rows`` x ``Columns / mask columns`` image pixels). Without a spacing (PNG,
JPEG, a DICOM without those tags) ``area_cm2`` is empty and ``area_note`` says why; so it
is for a spacing outside :data:`SPACING_RANGE_MM` (0.02-5 mm, before and after the
magnification correction) or a magnification factor outside :data:`MAGNIFICATION_RANGE`
(1-3): a header's ``1e200`` or ``1e-300`` never becomes an infinite or a zero area, and no
measure is ever NaN or infinite. The note also says which tag was used, and warns when the
spacing makes the image smaller than 20 cm across (the SIIM-ACR DICOMs: 1024 px at
0.139-0.194 mm is 14-20 cm, less than an adult chest; their spacing seems to describe the
image before it was resized to 1024 px, so their cm² figures are too small).

**Side.** In the standard radiological display of a frontal chest radiograph, PA or AP
alike, the patient's right is on the image's left (the viewer faces the patient). The side
is read from, in order:

1. ``PatientOrientation`` (0020,0020), when set: its first value is the patient direction of
   the image's rows (left to right); ``L`` means the patient's right is on the image's left,
   ``R`` the mirror image; an image turned by 90 degrees (``L``/``R`` in the second value)
   has no side (``n/a``);
2. ``ViewPosition`` (0018,5101) ``PA`` or ``AP``: the standard display is assumed (a
   ``LL``/``RL`` lateral view has no left/right split: side ``n/a``);
3. no tag (PNG, JPEG, a DICOM without either): the standard display is assumed.

Each 8-connected component of the mask is given to the side its centroid lies on (the image's
vertical midline splits them; a centroid exactly on it counts half to each side), so a lesion
that crosses the midline a little stays on one side. ``right_share`` is the fraction of the
area on the patient's right; ``side`` is ``right`` or ``left`` when that side holds more than
``1 - BOTH_MIN_SHARE`` of the area, ``both`` otherwise, ``none`` for an empty mask.
``side_basis`` records which rule gave the orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ptxseg.errors import ModelOutputError

#: a side with at least this share of the area makes a bilateral ("both") finding
BOTH_MIN_SHARE = 0.1
#: spacing that makes the image narrower than this (mm) gets a warning in ``area_note``
MIN_PLAUSIBLE_FIELD_MM = 200.0
#: the words of that warning (:attr:`LesionMeasures.spacing_doubtful` looks for them)
SMALL_FIELD = "small for an adult chest"
#: pixel spacing (mm) accepted for cm²: projection radiographs lie between about 0.05 mm
#: (mammography detectors) and 1 mm (a chest film resized to ~430 px); the bounds leave a
#: factor of 2.5 below and 5 above (a thumbnail, a magnification view) and refuse spacing
#: in metres or micrometres, or an absurd one (1e200, 1e-300)
SPACING_RANGE_MM = (0.02, 5.0)
#: EstimatedRadiographicMagnificationFactor accepted: source-to-detector over source-to-object
#: distance, 1 or more by geometry, about 1.1-1.2 for a chest film and up to 2 for a
#: magnification view
MAGNIFICATION_RANGE = (1.0, 3.0)
#: the columns a measures row adds to results.csv / per_image.csv
MEASURE_COLUMNS = ("area_px", "area_cm2", "area_note", "side", "right_share", "side_basis",
                   "max_prob")

STANDARD = "standard display assumed (patient's right on the image's left)"


@dataclass(frozen=True)
class Geometry:
    """What a measure needs from an image header.

    ``spacing_mm`` is ``(row spacing, column spacing)`` for an image of ``shape`` (rows,
    columns), or ``None`` with the reason in ``spacing_note``; ``right_on_image_left`` is
    ``None`` where left/right is undefined (lateral view).
    """

    shape: tuple[int, int] | None = None
    spacing_mm: tuple[float, float] | None = None
    spacing_note: str = "no pixel spacing (not a DICOM image)"
    right_on_image_left: bool | None = True
    side_basis: str = f"no orientation tags: {STANDARD}"


@dataclass(frozen=True)
class LesionMeasures:
    """The measures of one mask (see the module docstring)."""

    area_px: int
    area_cm2: float | None
    area_note: str
    side: str  # "none", "left", "right", "both" or "n/a"
    right_share: float | None
    side_basis: str
    max_prob: float | None

    def __post_init__(self) -> None:
        # no NaN or inf ever leaves the measures (JSON, CSV, captions)
        for name in ("area_cm2", "right_share", "max_prob"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"LesionMeasures.{name} {value} is not finite")

    @property
    def spacing_doubtful(self) -> bool:
        """The cm² rest on a spacing that makes the image narrower than a chest
        (:data:`MIN_PLAUSIBLE_FIELD_MM`; the SIIM-ACR DICOMs)."""
        return self.area_cm2 is not None and SMALL_FIELD in self.area_note

    def row(self) -> list[str]:
        """The :data:`MEASURE_COLUMNS` cells (empty where undefined)."""
        return [
            str(self.area_px),
            "" if self.area_cm2 is None else f"{self.area_cm2:.4f}",
            self.area_note,
            self.side,
            "" if self.right_share is None else f"{self.right_share:.4f}",
            self.side_basis,
            "" if self.max_prob is None else f"{self.max_prob:.6f}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "area_px": self.area_px,
            "area_cm2": self.area_cm2,
            "area_note": self.area_note,
            "side": self.side,
            "right_share": self.right_share,
            "side_basis": self.side_basis,
            "max_prob": self.max_prob,
        }


# ---------------------------------------------------------------------------------------------
# header


def _floats(value: Any) -> list[float] | None:
    try:
        out = [float(v) for v in (value if isinstance(value, (list, tuple)) else list(value))]
    except (TypeError, ValueError):
        return None
    return out if len(out) == 2 and all(math.isfinite(v) and v > 0 for v in out) else None


def _shown(raw: Any) -> str:
    """A header value in a note: at most 60 characters, control characters escaped."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _implausible(spacing: list[float]) -> bool:
    low, high = SPACING_RANGE_MM
    return not all(low <= v <= high for v in spacing)


def _range_note(what: str, spacing: list[float]) -> str:
    low, high = SPACING_RANGE_MM
    return (f"{what} {spacing[0]:g} x {spacing[1]:g} mm outside the plausible {low:g}-{high:g} "
            "mm of a radiograph: no cm²")  # fmt: skip


def spacing_from_dataset(ds) -> tuple[tuple[float, float] | None, str]:
    """``((row mm, column mm), note)`` from a pydicom dataset, or ``(None, reason)``: a
    spacing outside :data:`SPACING_RANGE_MM` (before or after the magnification correction)
    or a magnification factor outside :data:`MAGNIFICATION_RANGE` gives none."""
    raw = ds.get("PixelSpacing")
    if raw is not None and str(raw).strip():
        sp = _floats(raw)
        if sp is None:
            return None, f"PixelSpacing not usable ({_shown(raw)})"
        if _implausible(sp):
            return None, _range_note("PixelSpacing", sp)
        spacing, tag = sp, "PixelSpacing"
    else:
        raw = ds.get("ImagerPixelSpacing")
        if raw is None or not str(raw).strip():
            return None, "no PixelSpacing or ImagerPixelSpacing in the DICOM header"
        sp = _floats(raw)
        if sp is None:
            return None, f"ImagerPixelSpacing not usable ({_shown(raw)})"
        if _implausible(sp):
            return None, _range_note("ImagerPixelSpacing", sp)
        tag = "ImagerPixelSpacing (at the detector, not corrected for magnification)"
        mag = ds.get("EstimatedRadiographicMagnificationFactor")
        try:
            factor = float(mag) if mag is not None and str(mag).strip() else None
        except (TypeError, ValueError):
            return None, f"EstimatedRadiographicMagnificationFactor not usable ({_shown(mag)})"
        if factor is not None:
            low, high = MAGNIFICATION_RANGE
            if not (math.isfinite(factor) and low <= factor <= high):
                return None, (
                    f"EstimatedRadiographicMagnificationFactor {factor:g} outside the "
                    f"plausible {low:g}-{high:g}: no cm²"
                )
            sp = [v / factor for v in sp]
            tag = f"ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor {factor:g}"
            if _implausible(sp):
                return None, _range_note(tag, sp)
        spacing = sp
    note = f"from {tag} {spacing[0]:g} x {spacing[1]:g} mm"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows and cols:
        height, width = rows * spacing[0], cols * spacing[1]
        if min(height, width) < MIN_PLAUSIBLE_FIELD_MM:
            note += (
                f"; the image spans only {width / 10:.1f} x {height / 10:.1f} cm by this "
                f"spacing, {SMALL_FIELD}: the spacing may describe the image before "
                "it was resized, and the area be too small"
            )
    return (spacing[0], spacing[1]), note


def orientation_from_dataset(ds) -> tuple[bool | None, str]:
    """``(patient's right on the image's left?, basis)`` from a pydicom dataset."""
    po = ds.get("PatientOrientation")
    if po is None:
        values: list[str] = []
    elif isinstance(po, str):
        values = [v.strip().upper() for v in po.split("\\") if v.strip()]
    else:
        values = [str(v).strip().upper() for v in po if str(v).strip()]
    if values:
        shown = "\\".join(values)
        rows_to = values[0]
        cols_to = values[1] if len(values) > 1 else ""
        if "L" in rows_to and "R" not in rows_to:
            return True, f"PatientOrientation {shown}: rows run to the patient's left"
        if "R" in rows_to and "L" not in rows_to:
            return False, (
                f"PatientOrientation {shown}: rows run to the patient's right (mirror of the "
                "standard display)"
            )
        if ("L" in cols_to) != ("R" in cols_to):
            return None, (
                f"PatientOrientation {shown}: the image is turned (left/right runs along the "
                "columns), no left/right split by the midline"
            )
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in ("LL", "RL", "LAT", "LATERAL"):
        return None, f"ViewPosition {view}: a lateral view has no left/right split"
    if view in ("PA", "AP"):
        return True, f"ViewPosition {view}, no PatientOrientation: {STANDARD}"
    if view:
        return True, f"ViewPosition {view} (not PA/AP), no PatientOrientation: {STANDARD}"
    return True, f"no PatientOrientation or ViewPosition: {STANDARD}"


def geometry_from_dataset(ds) -> Geometry:
    """The :class:`Geometry` of a pydicom dataset (pixels not needed)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    spacing, note = spacing_from_dataset(ds)
    right_left, basis = orientation_from_dataset(ds)
    return Geometry((rows, cols) if rows and cols else None, spacing, note, right_left, basis)


def read_geometry(path: str | Path, header: Any = None) -> Geometry:
    """The :class:`Geometry` of an image file: from the header of a DICOM, else (PNG, JPEG...)
    no spacing and the standard display assumed.

    Args:
        path: the image file.
        header: its DICOM header when already read (``Item.header`` of a prediction, read with
            the pixels): the file is then not opened again.

    Raises:
        DataError: an unreadable DICOM header, or a corrupt value in it.
    """
    from ptxseg.data.imageio import _dcmread, _dicom_errors, is_dicom

    path = Path(path)
    if header is None:
        if not is_dicom(path):
            return Geometry(spacing_note=f"no pixel spacing ({path.suffix or 'non-DICOM'} image)")
        header = _dcmread(path, stop_before_pixels=True)
    with _dicom_errors(path):
        return geometry_from_dataset(header)


# ---------------------------------------------------------------------------------------------
# measures


def right_share(mask: np.ndarray, right_on_image_left: bool = True) -> float | None:
    """Fraction of the mask's area on the patient's right, each 8-connected component given
    to the side of its centroid (half to each when exactly on the midline); ``None`` for an
    empty mask."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(m, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    total = areas.sum()
    if total == 0:
        return None
    mid = (m.shape[1] - 1) / 2.0
    cx = centroids[1:, 0]
    on_left = np.where(cx < mid, 1.0, np.where(cx > mid, 0.0, 0.5))  # image left
    left_area = float((areas * on_left).sum())
    share_image_left = left_area / float(total)
    return share_image_left if right_on_image_left else 1.0 - share_image_left


def side_of(share: float | None) -> str:
    """``none`` / ``right`` / ``left`` / ``both`` from :func:`right_share` (see
    :data:`BOTH_MIN_SHARE`)."""
    if share is None:
        return "none"
    if share > 1.0 - BOTH_MIN_SHARE:
        return "right"
    if share < BOTH_MIN_SHARE:
        return "left"
    return "both"


def measure(
    mask: np.ndarray, geometry: Geometry | None = None, *, max_prob: float | None = None
) -> LesionMeasures:
    """The measures of a binary mask (``(H, W)``, any integer/bool dtype, non-zero =
    lesion) of an image with ``geometry`` (default: a non-DICOM image).

    ``max_prob`` is passed through (the image's highest probability, as in results.csv).

    Raises:
        PtxsegError: ``max_prob`` is NaN or infinite (one line, as evaluate's refusal of such
            probabilities).
    """
    geometry = geometry or Geometry()
    if max_prob is not None and not math.isfinite(max_prob):
        raise ModelOutputError(
            f"the model's probabilities are not finite (max {max_prob}): no measures of them"
        )
    area = int(np.count_nonzero(mask))
    area_cm2: float | None = None
    note = geometry.spacing_note
    if geometry.spacing_mm is not None:
        row_mm, col_mm = geometry.spacing_mm
        if geometry.shape is not None and geometry.shape != tuple(mask.shape):
            row_mm *= geometry.shape[0] / mask.shape[0]
            col_mm *= geometry.shape[1] / mask.shape[1]
            note += (
                f"; mask {mask.shape[0]}x{mask.shape[1]} px scaled to the image's "
                f"{geometry.shape[0]}x{geometry.shape[1]}"
            )
        area_cm2 = area * row_mm * col_mm / 100.0
        if not math.isfinite(area_cm2):  # the spacing is bounded: cannot happen, never shown
            area_cm2, note = None, f"{note}; the area overflows: no cm²"
    if geometry.right_on_image_left is None:
        share, side = None, ("none" if area == 0 else "n/a")
    else:
        share = right_share(mask, geometry.right_on_image_left) if area else None
        side = side_of(share)
    return LesionMeasures(
        area_px=area,
        area_cm2=area_cm2,
        area_note=note,
        side=side,
        right_share=share,
        side_basis=geometry.side_basis,
        max_prob=None if max_prob is None else float(max_prob),
    )
