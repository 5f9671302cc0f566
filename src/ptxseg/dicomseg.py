"""DICOM Segmentation objects of predicted masks, for PACS / OHIF / 3D Slicer, via highdicom.

One SEG per source DICOM image: ``BINARY`` segmentation with one segment,

- label ``Pneumothorax``, segmented property type SCT 36118008 "Pneumothorax", category SCT
  49755003 "Morphologically Abnormal Structure". The category is the one highdicom's
  ``SegmentDescription`` documentation gives as its CID 7150 ("Segmentation Property
  Categories") example, and CID 7150 lists it (pydicom ``codes.cid7150``). CID 7151
  ("Segmentation Property Types") is extensible and does not enumerate pneumothorax; SCT
  36118008 is the concept DICOM uses for it in CID 6102 ("Chest Finding or Feature Modifier")
  and CID 6105 ("Abnormal Lucency Finding or Feature"), pydicom ``codes.SCT.Pneumothorax``;
- algorithm type ``AUTOMATIC`` with its identification: name ``ptxseg``, family DCM 123110
  "Artificial Intelligence" (CID 7162), version = the ptxseg version, parameters
  ``run=<run folder name>,checkpoint_sha256=<sha>`` and any others given;
- recommended display colour: Okabe-Ito vermillion, as predict's overlays.

The SEG copies the source's patient and study (same Study Instance UID), references the
source series and instance (Referenced Series Sequence / Source Image Sequence), and has the
source's size: the mask must be at the image's native size (``Rows`` x ``Columns``).

**What it copies is valid.** The source header goes through
:func:`ptxseg.dicom_attrs.clean_source` first: a Study, Series or SOP Instance UID or SOP
Class UID that is missing, empty or malformed refuses the source (:class:`DataError` naming
the attribute); other values invalid for their VR are repaired when the intent is obvious
(``PatientAge`` ``42`` -> ``042Y``) or dropped. ``PatientOrientation`` (General Image, Type
2C: "empty if unknown" for an image without Image Orientation (Patient)) is the source's when
valid, else empty. The series number is the source's + 1000 within the IS range
(:func:`~ptxseg.dicom_attrs.derived_series_number`). Every UID of the SEG is checked before it
is returned. The result passes dicom3tools' ``dciodvfy`` with no error
(``tests/test_dicom_conformance.py``).

**Empty prediction.** The standard allows a SEG frame with no set pixel, and highdicom writes
one with ``omit_empty_frames=False`` (with its default, it logs a message and does the same
for a wholly empty mask). ptxseg writes a SEG with one empty frame for a negative image, so
every image predicted has its SEG and a viewer shows the segment as empty: no SEG would not
tell "negative" from "not processed".

UIDs are derived from the inputs (pydicom ``generate_uid`` with entropy sources): the series
from the source series, run and checkpoint (all SEGs of one run and one source series form
one series), the instance from the source instance, run, checkpoint and the mask's bytes, so
writing the same prediction again gives the same UIDs. Files are written atomically
(:mod:`ptxseg.fileio`).

Multi-frame sources are refused (:class:`~ptxseg.errors.DataError`): predict segments their
first frame only.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptxseg.data.imageio import named_warnings
from ptxseg.dicom_attrs import clean_source, derived_series_number, invalid_uids
from ptxseg.errors import DataError, one_line

SEGMENT_LABEL = "Pneumothorax"
CONTENT_LABEL = "PNEUMOTHORAX"  # CS, at most 16 characters
SERIES_DESCRIPTION = "ptxseg pneumothorax segmentation (research use)"
#: Okabe-Ito vermillion, the prediction's colour in :mod:`ptxseg.overlays`
DISPLAY_RGB = (213, 94, 0)


def _codes():
    from pydicom.sr.coding import Code

    return {
        # CID 7151 extensible; SCT 36118008 is in CID 6102 / 6105 (see the module docstring)
        "type": Code("36118008", "SCT", "Pneumothorax"),
        # CID 7150; highdicom's SegmentDescription docstring example
        "category": Code("49755003", "SCT", "Morphologically Abnormal Structure"),
        # CID 7162 Algorithm Family
        "family": Code("123110", "DCM", "Artificial Intelligence"),
    }


@dataclass(frozen=True)
class AlgorithmInfo:
    """What identifies the algorithm in the SEG: the ptxseg version, the run folder's name,
    the checkpoint's SHA-256, and any further parameters (e.g. the thresholds rule)."""

    version: str = ""
    run: str | None = None
    checkpoint_sha256: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)

    def resolved_version(self) -> str:
        if self.version:
            return self.version
        from ptxseg import __version__

        return __version__

    def parameter_dict(self) -> dict[str, str]:
        """The Algorithm Parameters, ``,`` and ``=`` in values replaced (they separate
        items)."""
        out: dict[str, str] = {}
        if self.run:
            out["run"] = self.run
        if self.checkpoint_sha256:
            out["checkpoint_sha256"] = self.checkpoint_sha256
        out.update(self.parameters)
        return {
            str(k).replace(",", ";").replace("=", ":"): str(v).replace(",", ";").replace("=", ":")
            for k, v in out.items()
        }


def read_source(path: str | Path):
    """The header of a source DICOM (pixel data not read: the SEG needs none, so JPEG and
    other compressed sources need no decoder). Raises :class:`DataError` on a file that is not
    a readable DICOM."""
    from ptxseg.data.imageio import _dcmread

    return _dcmread(Path(path), stop_before_pixels=True)


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _drop_orphan_spacing(source) -> None:
    """Remove ``PixelSpacing`` from ``source`` (a cleaned copy) when it has no patient
    coordinate system (a projection radiograph: no Frame of Reference, or no Image Position
    (Patient)) and no ``SliceThickness``.

    highdicom 0.28 copies such a ``PixelSpacing`` into a Pixel Measures item without Slice
    Thickness, which its own reader then refuses (``segread``: "Sequence does not have the
    required attributes for a Pixel Measures Sequence"). Without a frame of reference the
    Pixel Measures functional group is optional (highdicom's PR #183, "Allow segmentations of
    images without a frame of reference UID", left it out for this case): the SEG frame is
    tied to the source image pixel for pixel by its Derivation Image Sequence (Spatial
    Locations Preserved YES), and the source keeps its own spacing.
    """
    from highdicom.spatial import get_image_coordinate_system

    if (
        "PixelSpacing" in source
        and "SliceThickness" not in source
        and get_image_coordinate_system(source) is None
    ):
        del source.PixelSpacing


def build_segmentation(source, mask: np.ndarray, algorithm: AlgorithmInfo | None = None, *,
                       name: str | None = None):
    """The highdicom ``Segmentation`` of ``mask`` over the source image ``source`` (a pydicom
    dataset; pixel data not needed).

    Args:
        source: the source DICOM's dataset.
        mask: ``(Rows, Columns)`` binary mask (non-zero = pneumothorax), the source's size.
        algorithm: what identifies the model (default: the ptxseg version only).
        name: how to name the source in errors (default: its SOP Instance UID).

    Raises:
        DataError: a multi-frame source, a mask of another size, a source whose referenced
            UIDs are missing, empty or malformed, or one highdicom cannot derive a SEG from.
    """
    import highdicom as hd

    algorithm = algorithm or AlgorithmInfo()
    label = name or str(source.get("SOPInstanceUID", "") or "source DICOM")
    frames = int(source.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(label, f"multi-frame DICOM ({frames} frames): no DICOM SEG is written")
    shape = (int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0))
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise DataError(
            label,
            f"mask {mask.shape[0]}x{mask.shape[1]} differs from the image's {shape[0]}x"
            f"{shape[1]} (Rows x Columns): the SEG needs the mask at native size",
        )
    binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    source = clean_source(source, name=label).dataset
    _drop_orphan_spacing(source)
    codes = _codes()
    version = algorithm.resolved_version()
    params = algorithm.parameter_dict()
    try:
        ident = hd.AlgorithmIdentificationSequence(
            name="ptxseg",
            family=codes["family"],
            version=version,
            source="ptxseg",
            parameters=params or None,
        )
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=SEGMENT_LABEL,
            segmented_property_category=codes["category"],
            segmented_property_type=codes["type"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident,
            display_color=hd.color.CIELabColor.from_rgb(*DISPLAY_RGB),
        )
        key = (algorithm.run, algorithm.checkpoint_sha256, version)
        with named_warnings(label):  # other warnings name the source; one at a time
            # highdicom checks the copied Patient's Name; SIIM's are single-component ids,
            # which it warns about: nothing the user of the SEG can act on
            warnings.filterwarnings("ignore", message=".*intended person name.*")
            seg = hd.seg.Segmentation(
                source_images=[source],
                pixel_array=binary,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=_uid("seg-series", source.SeriesInstanceUID, *key),
                series_number=derived_series_number(source),
                sop_instance_uid=_uid(
                    "seg-instance",
                    source.SOPInstanceUID,
                    *key,
                    sorted(params.items()),
                    hashlib.sha256(binary.tobytes()).hexdigest(),
                ),
                instance_number=1,
                manufacturer="ptxseg",
                manufacturer_model_name="ptxseg",
                software_versions=version,
                device_serial_number=(algorithm.checkpoint_sha256 or "unknown")[:64],
                content_label=CONTENT_LABEL,
                content_description=SERIES_DESCRIPTION[:64],
                series_description=SERIES_DESCRIPTION,
                omit_empty_frames=False,  # an empty prediction: one empty frame
            )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on bad sources
        raise DataError(
            label, f"cannot make a DICOM SEG from it ({type(exc).__name__}: {one_line(str(exc))})"
        ) from None
    # General Image: Type 2C, "empty if unknown", for an image without Image Orientation
    # (Patient); the frame is the source's pixel for pixel, so its orientation is the source's
    seg.PatientOrientation = source.get("PatientOrientation") or ""
    bad = invalid_uids(seg)
    if bad:  # never written: a UID the checks above let through would be a defect here
        raise DataError(label, f"the DICOM SEG would hold an invalid UID ({bad[0]}): not written")
    return seg


def write_dicom_seg(
    source: str | Path | Any,
    mask: np.ndarray,
    out: str | Path,
    algorithm: AlgorithmInfo | None = None,
    *,
    name: str | None = None,
) -> Path:
    """Write the DICOM SEG of ``mask`` over ``source`` (a DICOM path or a pydicom dataset, its
    header is enough) to ``out``, atomically (see :func:`build_segmentation`). ``name``: how
    errors name a dataset source (default: the path, else its SOP Instance UID).

    Raises:
        DataError: an unreadable source, or one no SEG can be made from.
        OSError: ``out`` cannot be written.
    """
    from ptxseg.fileio import atomic_open

    if isinstance(source, (str, Path)):
        name = name or str(source)
        source = read_source(source)
    seg = build_segmentation(source, mask, algorithm, name=name)
    with atomic_open(out, "wb") as fh:
        seg.save_as(fh, enforce_file_format=True)
    return Path(out)
