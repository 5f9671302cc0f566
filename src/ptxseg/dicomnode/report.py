"""The DICOM SR of one segmented radiograph: a TID 1500 Measurement Report (highdicom,
Comprehensive SR), as IHE AI Results asks of an AI result.

Content (codes: SCT = SNOMED CT, DCM = DICOM, UCUM = units; ``99PTXSEG`` is this project's
private scheme, for the one concept no standard code names):

- observer: the device ``ptxseg`` (manufacturer ``ptxseg``, model name = the run folder's name,
  serial number = the model's SHA-256, cut to 64 characters), procedure reported SCT 399208008
  "Plain chest X-ray";
- an image-level group (TID 1501) on the source image: the finding SCT 36118008
  "Pneumothorax" = SCT 52101004 "Present" or SCT 2667000 "Absent", its laterality (SCT
  272741003 "Laterality" = SCT 24028007 "Right", 7771000 "Left", 51440002 "Right and left";
  absent for a negative image or a view without a left/right split), the maximum probability
  (99PTXSEG MAXPROB, unit UCUM ``1``);
- a planar ROI group (TID 1410) on the SEG's segment 1 (the segment of every ptxseg SEG, empty
  for a negative image): the area (SCT 42798000 "Area", UCUM ``cm2``) when the image has a
  pixel spacing, and a TEXT comment (DCM 121106 "Comment") with predict's ``area_note``: which
  spacing tag the area rests on and, for images whose spacing makes them narrower than a chest
  (the SIIM-ACR DICOMs), that the area is likely too small;
- every group carries the algorithm identification (TID 4019: name ``ptxseg``, the ptxseg
  version, parameters ``run=``, ``model_sha256=``, the TTA and the rule);
- ``VerificationFlag`` ``UNVERIFIED`` (no person has checked it), ``CompletionFlag``
  ``COMPLETE``; the source image and the SEG are listed as evidence (Current Requested
  Procedure Evidence Sequence).

UIDs are derived from the source instance and the SEG (pydicom ``generate_uid`` with entropy
sources), so the report of the same prediction has the same UIDs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ptxseg.dicomseg import AlgorithmInfo
from ptxseg.errors import DataError
from ptxseg.measures import LesionMeasures

SERIES_DESCRIPTION = "ptxseg pneumothorax report (research use, unverified)"
PRIVATE_SCHEME = "99PTXSEG"


def _code(value: str, scheme: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


@dataclass(frozen=True)
class Codes:
    """The coded concepts of the report (see the module doc)."""

    pneumothorax = _code("36118008", "SCT", "Pneumothorax")
    present = _code("52101004", "SCT", "Present")
    absent = _code("2667000", "SCT", "Absent")
    laterality = _code("272741003", "SCT", "Laterality")
    right = _code("24028007", "SCT", "Right")
    left = _code("7771000", "SCT", "Left")
    both = _code("51440002", "SCT", "Right and left")
    area = _code("42798000", "SCT", "Area")
    cm2 = _code("cm2", "UCUM", "square centimeter")
    ratio = _code("1", "UCUM", "no units")
    max_prob = _code("MAXPROB", PRIVATE_SCHEME, "Maximum probability of pneumothorax")
    comment = _code("121106", "DCM", "Comment")
    procedure = _code("399208008", "SCT", "Plain chest X-ray")
    family = _code("123110", "DCM", "Artificial Intelligence")


SIDES = {"right": Codes.right, "left": Codes.left, "both": Codes.both}


def uid(*parts: Any) -> str:
    """A UID derived from ``parts`` (the same parts, the same UID)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def algorithm_parameters(algorithm: AlgorithmInfo) -> list[str]:
    """The algorithm's parameters as ``key=value`` strings (TID 4019 rows)."""
    params = algorithm.parameter_dict()
    if "checkpoint_sha256" in params:  # the same digest, named for what it is here
        params = {"model_sha256": params.pop("checkpoint_sha256"), **params}
    return [f"{k}={v}" for k, v in params.items()]


def build_report(source, seg, measures: LesionMeasures, algorithm: AlgorithmInfo, *,
                 name: str | None = None):  # fmt: skip
    """The Comprehensive SR (TID 1500) of one prediction.

    Args:
        source: the source image's dataset (pixel data not needed).
        seg: its ptxseg SEG (:func:`ptxseg.dicomseg.build_segmentation`).
        measures: the lesion measures of the mask the SEG holds (:func:`ptxseg.measures.measure`).
        algorithm: what identifies the model (:func:`ptxseg.image_outputs.seg_algorithm`).
        name: how errors name the source (default: its SOP Instance UID).

    Raises:
        DataError: a source highdicom cannot reference (missing UIDs...).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    label = name or str(source.get("SOPInstanceUID", "") or "source DICOM")
    version = algorithm.resolved_version()
    sha = algorithm.checkpoint_sha256 or "unknown"
    try:
        algorithm_id = hd.sr.AlgorithmIdentification(
            name="ptxseg", version=version, parameters=algorithm_parameters(algorithm) or None,
        )  # fmt: skip
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("ptxseg-device", algorithm.run, sha),
            name="ptxseg",
            manufacturer_name="ptxseg",
            model_name=(algorithm.run or "ptxseg")[:64],
            serial_number=sha[:64],
        )
        context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        )
        positive = measures.area_px > 0
        evaluations = [hd.sr.QualitativeEvaluation(
            Codes.pneumothorax, Codes.present if positive else Codes.absent)]  # fmt: skip
        if positive and measures.side in SIDES:
            evaluations.append(hd.sr.QualitativeEvaluation(Codes.laterality, SIDES[measures.side]))
        image_measures = []
        if measures.max_prob is not None:
            image_measures.append(hd.sr.Measurement(
                name=Codes.max_prob, value=round(float(measures.max_prob), 6), unit=Codes.ratio,
                algorithm_id=algorithm_id,
            ))  # fmt: skip
        source_uid = str(source.SOPInstanceUID)
        image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uid("ptxseg-finding", source_uid, seg.SOPInstanceUID),
                identifier="ptxseg pneumothorax finding",
            ),
            finding_type=Codes.pneumothorax,
            algorithm_id=algorithm_id,
            measurements=image_measures or None,
            qualitative_evaluations=evaluations,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        )
        roi_measures = []
        if measures.area_cm2 is not None:
            roi_measures.append(hd.sr.Measurement(
                name=Codes.area, value=round(float(measures.area_cm2), 4), unit=Codes.cm2,
                algorithm_id=algorithm_id,
            ))  # fmt: skip
        roi_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uid("ptxseg-region", source_uid, seg.SOPInstanceUID),
                identifier="ptxseg pneumothorax region",
            ),
            referenced_segment=hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                frame_number=1, segment_number=1,
                source_image=hd.sr.SourceImageForSegmentation.from_source_image(source),
            ),
            finding_type=Codes.pneumothorax,
            algorithm_id=algorithm_id,
            measurements=roi_measures or None,
        )
        for item in roi_group[0].ContentSequence:
            # PS3.3 C.18.3.1: no Referenced Segment Number beside a Referenced Frame Number
            # (frame 1 of a one-segment SEG is segment 1); highdicom writes both
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                    del ref.ReferencedSegmentNumber
        roi_group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=Codes.comment, value=f"Area: {measures.area_note}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))  # fmt: skip
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=Codes.procedure,
            imaging_measurements=[image_group, roi_group],
        )
        with warnings.catch_warnings():
            # highdicom checks the copied Patient's Name; SIIM's are single-component ids
            warnings.filterwarnings("ignore", message=".*intended person name.*")
            sr = hd.sr.ComprehensiveSR(
                evidence=[source, seg],
                content=report[0],
                series_instance_uid=uid("sr-series", source.SeriesInstanceUID,
                                        algorithm.run, sha, version),  # fmt: skip
                series_number=int(source.get("SeriesNumber", 0) or 0) + 1001,
                sop_instance_uid=uid("sr-instance", source_uid, seg.SOPInstanceUID),
                instance_number=1,
                manufacturer="ptxseg",
                is_complete=True,
                is_final=False,
                is_verified=False,
                series_description=SERIES_DESCRIPTION,
            )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types on bad sources
        raise DataError(
            label, f"cannot make a DICOM SR from it ({type(exc).__name__}: {exc})"
        ) from None
    drop_invalid_values(sr)
    return sr


#: the VRs whose copied values are checked (:func:`drop_invalid_values`)
_CHECKED_VRS = ("AS", "DA", "TM", "DT", "IS", "DS")


def drop_invalid_values(ds) -> list[str]:
    """Empty the top-level values of ``ds`` copied from a source that are invalid for their
    VR (a SIIM ``PatientAge`` of ``42``: an AS is ``nnnY``), rather than guess what they
    meant; an empty value is valid where the attribute is type 2 or 3, which is all a derived
    object copies. Returns the keywords emptied."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    emptied = []
    for elem in ds:
        if elem.VR not in _CHECKED_VRS or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        try:
            for value in values:
                validate_value(elem.VR, str(value), config.RAISE)
        except ValueError:
            elem.value = None
            emptied.append(elem.keyword)
    return emptied
