"""The Secondary Capture of one prediction (``--secondary-capture``): predict's captioned
overlay (:func:`ptxseg.overlays.draw_overlay`: the radiograph with the predicted region, the
finding, area and maximum probability) as an RGB image, for viewers that show neither SEG nor
SR.

It is marked not for diagnostic use three ways: the words ``NOT FOR DIAGNOSTIC USE`` are drawn
in the image's caption, ``BurnedInAnnotation`` is ``YES`` (the caption is part of the pixels),
and ``ImageComments`` / ``SeriesDescription`` say it. Its modality is ``OT`` and its conversion
type ``WSD`` (workstation), so a routing rule on CR / DX does not send it back to the node
(which would refuse it anyway: :mod:`ptxseg.dicomnode.scp`).

``PatientOrientation`` is the source's when it has two valid values, else the orientation the
lesion measures assume (:mod:`ptxseg.measures`): ``L\\F`` for the standard display of a frontal
view (``R\\F`` for a mirrored one), ``P\\F`` for a lateral view. The overlay's longest side is
at most :data:`ptxseg.image_outputs.OVERLAY_MAX_SIDE`, as predict's.
"""

from __future__ import annotations

import warnings

import numpy as np

from ptxseg.dicomnode.report import drop_invalid_values, uid
from ptxseg.dicomseg import AlgorithmInfo
from ptxseg.errors import DataError
from ptxseg.measures import Geometry, LesionMeasures

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE (ptxseg research output, unverified)"
SERIES_DESCRIPTION = "ptxseg overlay - NOT FOR DIAGNOSTIC USE"


def orientation(source, geometry: Geometry) -> tuple[str, str]:
    """The overlay's ``PatientOrientation`` (see the module doc)."""
    from highdicom.enum import PatientOrientationValuesBiped

    value = source.get("PatientOrientation")
    values = list(value) if value is not None and not isinstance(value, str) else (
        [v for v in str(value or "").split("\\") if v])  # fmt: skip
    if len(values) == 2:
        try:
            for v in values:
                for letter in str(v):
                    PatientOrientationValuesBiped(letter)
            return str(values[0]), str(values[1])
        except ValueError:
            pass
    if geometry.right_on_image_left is None:
        return "P", "F"
    return ("L", "F") if geometry.right_on_image_left else ("R", "F")


def build_capture(source, image: np.ndarray, mask: np.ndarray, measures: LesionMeasures,
                  geometry: Geometry, algorithm: AlgorithmInfo, *,
                  name: str | None = None):  # fmt: skip
    """The Secondary Capture image of one prediction.

    Args:
        source: the source image's dataset (pixel data not needed).
        image: its ``(H, W)`` uint8 gray image; mask: the ``(H, W)`` predicted mask.
        measures, geometry: the lesion measures of the mask and the image's geometry.
        algorithm: what identifies the model.
        name: how errors name the source (default: its SOP Instance UID).

    Raises:
        DataError: a source highdicom cannot derive an image from.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    from ptxseg.image_outputs import OVERLAY_MAX_SIDE
    from ptxseg.overlays import caption_for, draw_overlay

    label = name or str(source.get("SOPInstanceUID", "") or "source DICOM")
    caption = [*caption_for(measures), NOT_FOR_DIAGNOSIS]
    rgb = np.ascontiguousarray(draw_overlay(image, mask, caption=caption,
                                            max_side=OVERLAY_MAX_SIDE))  # fmt: skip
    version = algorithm.resolved_version()
    sha = algorithm.checkpoint_sha256 or "unknown"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*intended person name.*")
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=rgb,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=uid("sc-series", source.SeriesInstanceUID, algorithm.run,
                                        sha, version),  # fmt: skip
                series_number=int(source.get("SeriesNumber", 0) or 0) + 1002,
                sop_instance_uid=uid("sc-instance", source.SOPInstanceUID, algorithm.run, sha,
                                     version, measures.area_px, measures.max_prob),  # fmt: skip
                instance_number=1,
                manufacturer="ptxseg",
                patient_orientation=orientation(source, geometry),
                series_description=SERIES_DESCRIPTION,
            )
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on bad sources
        raise DataError(
            label, f"cannot make a Secondary Capture from it ({type(exc).__name__}: {exc})"
        ) from None
    sc.Modality = "OT"
    sc.ConversionType = "WSD"
    if "Laterality" not in sc:  # General Series, type 2C: empty (a chest is not paired)
        sc.Laterality = None
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = (
        f"ptxseg {version} prediction overlay of the source image; {NOT_FOR_DIAGNOSIS}"
    )[:1024]
    sc.ManufacturerModelName = (algorithm.run or "ptxseg")[:64]
    sc.SoftwareVersions = version
    if str(source.get("LossyImageCompression", "")) == "01":  # PS3.3 C.7.6.1.1.5: lossy
        sc.LossyImageCompression = "01"  # stays lossy in every derived image
        if "LossyImageCompressionMethod" in source:
            sc.LossyImageCompressionMethod = source.LossyImageCompressionMethod
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    drop_invalid_values(sc)
    return sc
