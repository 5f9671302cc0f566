"""DICOM SEG of predicted masks: written for each real SIIM DICOM (JPEG Baseline sources) and
read back with highdicom and pydicom: pixels, referenced UIDs, segment, codes, algorithm."""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from ptxseg import __version__
from ptxseg.dicomseg import AlgorithmInfo, write_dicom_seg
from ptxseg.errors import DataError
from ptxseg.fileio import sha256_file as file_sha256

ALGO = AlgorithmInfo(run="run-7", checkpoint_sha256="0123abcd" * 8, parameters={"tta": "none"})


def _drawn_mask(shape, k: int) -> np.ndarray:
    """An ellipse whose place and size depend on ``k`` (one lung or the other)."""
    mask = np.zeros(shape, np.uint8)
    h, w = shape
    cx = w // 4 if k % 2 else 3 * w // 4
    cv2.ellipse(mask, (cx, h // 3 + 10 * k), (40 + 7 * k, 90 + 5 * k), 15 * k, 0, 360, 1, -1)
    return mask


def _known_mask(sample_dir, path, shape, k):
    png = sample_dir / "dicom_masks" / f"{path.stem}.png"
    if png.exists():
        return (cv2.imread(str(png), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8), "truth"
    return _drawn_mask(shape, k), "drawn"


def test_seg_for_each_real_dicom_reads_back(sample_dir, tmp_path):
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))
    assert len(dicoms) == 12
    kinds = set()
    for k, path in enumerate(dicoms):
        src = pydicom.dcmread(path)
        assert src.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
        shape = (int(src.Rows), int(src.Columns))
        mask, kind = _known_mask(sample_dir, path, shape, k)
        kinds.add(kind)
        assert mask.any() and mask.shape == shape
        # a path for most, the full dataset (compressed pixels loaded) for some
        source = src if k % 4 == 0 else path
        out = write_dicom_seg(source, mask * 255, tmp_path / f"{path.stem}.seg.dcm", ALGO)

        seg = hd.seg.segread(out)
        assert seg.SOPClassUID == SegmentationStorage
        assert seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == src.StudyInstanceUID
        assert seg.PatientID == src.PatientID
        assert seg.get_source_image_uids() == [
            (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
        ]
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])
        assert pixels.shape == (1, *shape, 1)
        np.testing.assert_array_equal(pixels[0, ..., 0], mask)

        desc = seg.get_segment_description(1)
        assert desc.segment_label == "Pneumothorax"
        prop = desc.segmented_property_type
        cat = desc.segmented_property_category
        assert (prop.value, prop.scheme_designator, prop.meaning) == (
            "36118008", "SCT", "Pneumothorax"
        )
        assert (cat.value, cat.scheme_designator) == ("49755003", "SCT")
        assert desc.algorithm_type.value == "AUTOMATIC"
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmName == "ptxseg" and algo.AlgorithmVersion == __version__
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert algo.AlgorithmParameters == (
            f"run=run-7,checkpoint_sha256={'0123abcd' * 8},tta=none"
        )

        plain = pydicom.dcmread(out)  # pydicom alone decodes the bit-packed frame
        assert plain.NumberOfFrames == 1
        np.testing.assert_array_equal(plain.pixel_array, mask)
        assert plain.SeriesInstanceUID != src.SeriesInstanceUID
        assert plain.SOPInstanceUID != src.SOPInstanceUID
    assert kinds == {"truth", "drawn"}  # the one real mask was used
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


def test_empty_prediction_writes_one_empty_frame(sample_dir, tmp_path):
    path = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    src = pydicom.dcmread(path, stop_before_pixels=True)
    empty = np.zeros((src.Rows, src.Columns), np.uint8)
    out = write_dicom_seg(path, empty, tmp_path / "neg.seg.dcm")
    seg = hd.seg.segread(out)
    assert seg.NumberOfFrames == 1
    pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])
    assert pixels.shape == (1, src.Rows, src.Columns, 1) and not pixels.any()
    assert not pydicom.dcmread(out).pixel_array.any()
    # no run given: the algorithm is still identified by the ptxseg version
    algo = seg.get_segment_description(1).algorithm_identification[0]
    assert algo.AlgorithmVersion == __version__ and "AlgorithmParameters" not in algo


def test_uids_follow_the_inputs(sample_dir, tmp_path):
    path = sorted((sample_dir / "dicom").glob("*.dcm"))[1]
    src = pydicom.dcmread(path, stop_before_pixels=True)
    mask = _drawn_mask((src.Rows, src.Columns), 3)
    a = pydicom.dcmread(write_dicom_seg(path, mask, tmp_path / "a.dcm", ALGO))
    b = pydicom.dcmread(write_dicom_seg(path, mask, tmp_path / "b.dcm", ALGO))
    c = pydicom.dcmread(write_dicom_seg(path, 1 - mask, tmp_path / "c.dcm", ALGO))
    other_run = AlgorithmInfo(run="run-8", checkpoint_sha256=ALGO.checkpoint_sha256)
    d = pydicom.dcmread(write_dicom_seg(path, mask, tmp_path / "d.dcm", other_run))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID == a.SeriesInstanceUID
    assert d.SOPInstanceUID != a.SOPInstanceUID and d.SeriesInstanceUID != a.SeriesInstanceUID


def test_errors_name_the_file_and_leave_no_file(sample_dir, tmp_path, make_dicom):
    path = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    out = tmp_path / "x.seg.dcm"
    out.write_bytes(b"old")
    with pytest.raises(DataError, match=r"mask 512x512 differs from the image's 1024x1024"):
        write_dicom_seg(path, np.zeros((512, 512), np.uint8), out)
    assert out.read_bytes() == b"old"  # untouched
    png = sample_dir / "png_images" / "0_train_0_.png"
    with pytest.raises(DataError, match=str(png)):
        write_dicom_seg(png, np.zeros((1024, 1024), np.uint8), out)
    multi = make_dicom(tmp_path / "multi.dcm", np.zeros((4, 4), np.uint8), NumberOfFrames=3)
    with pytest.raises(DataError, match=r"multi\.dcm: multi-frame DICOM \(3 frames\)"):
        write_dicom_seg(multi, np.zeros((4, 4), np.uint8), out)
    no_study = make_dicom(tmp_path / "nostudy.dcm", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"nostudy\.dcm: StudyInstanceUID \(0020,000D\) is "
                       r"missing: the DICOM SEG must reference it \(Type 1\), no DICOM SEG is "
                       r"written$"):
        write_dicom_seg(no_study, np.zeros((4, 4), np.uint8), out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "multi.dcm", "nostudy.dcm", "x.seg.dcm"
    ]


def test_file_sha256(tmp_path):
    import hashlib

    p = tmp_path / "ckpt"
    p.write_bytes(b"weights" * 1000)
    assert file_sha256(p) == hashlib.sha256(b"weights" * 1000).hexdigest()
