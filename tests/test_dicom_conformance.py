"""DICOM SEGs of hostile sources, through ``ptxseg predict --dicom-seg``: DICOMs built from a
real SIIM-ACR DICOM by pydicom edits (blank and malformed UIDs, the largest SeriesNumber,
control characters in the name, an age without its unit, dates and times in another format,
absurd pixel spacing and magnification). Every SEG written passes dicom3tools' ``dciodvfy``
without an Error line and reads back with highdicom and pydicom; a source whose referenced
UIDs are invalid is a failed row that names the attribute, with its mask and no SEG; no
measure is infinite or zero from an absurd spacing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ptxseg.postprocess import PostParams
from tests.conftest import make_run
from tests.dicom_util import dciodvfy, unexplained, validate  # noqa: F401 (fixture)
from tests.test_predict import SIZE, read_rows, run_cli

LONG_UID = "1.2." + "3" * 66  # 70 characters: UI allows 64
CONTROL_NAME = "Doe\x1b[31m\x07\x00\r\nJohn"
#: case -> the edits of the real DICOM (None: delete the attribute)
CASES: dict[str, dict] = {
    "blank-study": {"StudyInstanceUID": ""},
    "blank-series": {"SeriesInstanceUID": ""},
    "blank-sop": {"SOPInstanceUID": ""},
    "long-uid": {"SOPInstanceUID": LONG_UID},
    "bad-uid": {"StudyInstanceUID": "1.2.03.4x"},
    "series-max": {"SeriesNumber": 2147483647, "PatientOrientation": ["L", "F"]},
    "control-name": {"PatientName": CONTROL_NAME},
    "age-dates": {"PatientAge": "42", "StudyDate": "2019-03-04", "StudyTime": "12:30:05",
                  "PatientSex": "m", "PatientOrientation": ["A", "P"]},
    "nested-uid": {"ReferencedStudySequence": "long-uid item"},
    "spacing-huge": {"PixelSpacing": ["1e200", "1e200"]},
    "spacing-tiny": {"PixelSpacing": ["1e-300", "1e-300"]},
    "magnification": {"PixelSpacing": None, "ImagerPixelSpacing": ["0.143", "0.143"],
                      "EstimatedRadiographicMagnificationFactor": "1e-300"},
}  # fmt: skip
#: case -> the attribute its failed row names
REFUSED = {
    "blank-study": "StudyInstanceUID (0020,000D) is empty",
    "blank-series": "SeriesInstanceUID (0020,000E) is empty",
    "blank-sop": "SOPInstanceUID (0008,0018) is empty",
    "long-uid": f"SOPInstanceUID (0008,0018) '{LONG_UID[:48]}...' is not a valid UID "
                "(70 characters, at most 64)",
    "bad-uid": "StudyInstanceUID (0020,000D) '1.2.03.4x' is not a valid UID",
}  # fmt: skip


def _hostile(real: Path, case: str, edits: dict, out: Path) -> Path:
    """The real DICOM with ``edits`` (pydicom warns of the invalid values it is given)."""
    ds = pydicom.dcmread(real)  # pixels kept: predict reads them
    uid = generate_uid(entropy_srcs=[case])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, value in edits.items():
            if value is None:
                del ds[key]
            elif key == "ReferencedStudySequence":
                item = Dataset()
                item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
                item.ReferencedSOPInstanceUID = LONG_UID
                ds.ReferencedStudySequence = [item]
            else:
                setattr(ds, key, value)
        path = out / f"{case}.dcm"
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def predicted(sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    run = root / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    real = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    src = root / "in"
    src.mkdir()
    paths = {case: _hostile(real, case, edits, src) for case, edits in CASES.items()}
    out = root / "out"
    rc, stdout, stderr = run_cli(["predict", str(run), str(src), "--out", str(out),
                                  "--dicom-seg"])  # fmt: skip
    assert rc == 2, stderr  # the refused SEGs are failed rows
    rows = {Path(r["source"]).stem: r for r in read_rows(out / "results.csv")}
    return {"out": out, "rows": rows, "paths": paths, "stderr": stderr, "real": real}


def test_invalid_referenced_uids_are_refused_by_name(predicted):
    rows, out = predicted["rows"], predicted["out"]
    assert len(LONG_UID) == 70
    for case, reason in REFUSED.items():
        row = rows[case]
        assert row["status"].startswith(f"error: DICOM SEG not written: {reason}"), row
        assert row["status"].endswith("the DICOM SEG must reference it (Type 1), no DICOM SEG "
                                      "is written")  # fmt: skip
        assert row["dicom_seg"] == "" and not (out / "dicom_seg" / f"{case}.dcm").exists()
        assert (out / "masks" / f"{case}.png").is_file()  # the mask and measures are kept
        assert f"warning: {predicted['paths'][case]}: DICOM SEG not written" in predicted["stderr"]
    written = {p.stem for p in (out / "dicom_seg").iterdir()}
    assert written == set(CASES) - set(REFUSED)


def test_every_seg_written_passes_dciodvfy_and_reads_back(predicted, dciodvfy):  # noqa: F811
    rows, out = predicted["rows"], predicted["out"]
    for case in sorted(set(CASES) - set(REFUSED)):
        assert rows[case]["status"] == "ok", rows[case]
        path = out / rows[case]["dicom_seg"]
        errors, warnings = validate(dciodvfy, path)
        assert errors == [], (case, errors)
        assert unexplained(warnings) == [], (case, warnings)
        src = pydicom.dcmread(predicted["paths"][case], stop_before_pixels=True)
        seg = hd.seg.segread(path)
        assert seg.get_source_image_uids() == [
            (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
        ]
        mask = pydicom.dcmread(path).pixel_array
        assert mask.shape == (src.Rows, src.Columns)
        assert int(mask.sum()) == int(rows[case]["area_px"])


def test_series_number_stays_in_the_is_range(predicted):
    seg = pydicom.dcmread(predicted["out"] / "dicom_seg" / "series-max.dcm")
    assert 2147483647 == 2**31 - 1  # IS: a signed 32-bit integer
    assert 1 <= int(seg.SeriesNumber) <= 2**31 - 1
    assert int(seg.SeriesNumber) != 2147483647  # not the source's series either
    # a valid PatientOrientation is the source's, the frame being the source's pixel for pixel
    assert list(seg.PatientOrientation) == ["L", "F"]
    real = pydicom.dcmread(predicted["real"], stop_before_pixels=True)
    other = pydicom.dcmread(predicted["out"] / "dicom_seg" / "control-name.dcm")
    assert int(other.SeriesNumber) == int(real.SeriesNumber) + 1000


def test_invalid_source_values_are_repaired_or_dropped(predicted):
    segs = predicted["out"] / "dicom_seg"
    named = pydicom.dcmread(segs / "control-name.dcm")
    assert str(named.PatientName) == ""  # Type 2: present, empty
    assert named.PatientID == pydicom.dcmread(predicted["real"]).PatientID
    dated = pydicom.dcmread(segs / "age-dates.dcm")
    assert (dated.PatientAge, dated.StudyDate, dated.StudyTime, dated.PatientSex) == (
        "042Y", "20190304", "123005", "M"
    )
    assert "PatientOrientation" in dated and dated.PatientOrientation == ""  # A\P: both AP
    nested = pydicom.dcmread(segs / "nested-uid.dcm")
    assert "ReferencedStudySequence" not in nested  # Type 3, an invalid UID inside
    # the real source's age 'NN' (AS needs 'NNNY') comes out as NNN years
    real = pydicom.dcmread(predicted["real"], stop_before_pixels=True)
    assert len(real.PatientAge) == 2 and real.PatientAge.isdigit()
    for case in ("series-max", "spacing-huge"):
        seg = pydicom.dcmread(segs / f"{case}.dcm")
        assert seg.PatientAge == f"{int(real.PatientAge):03d}Y"


def test_absurd_spacing_gives_no_cm2(predicted):
    rows = predicted["rows"]
    notes = {
        "spacing-huge": "PixelSpacing 1e+200 x 1e+200 mm outside the plausible 0.02-5 mm",
        "spacing-tiny": "PixelSpacing 1e-300 x 1e-300 mm outside the plausible 0.02-5 mm",
        "magnification": "EstimatedRadiographicMagnificationFactor 1e-300 outside the "
                         "plausible 1-3",
    }  # fmt: skip
    for case, note in notes.items():
        row = rows[case]
        assert row["area_cm2"] == "" and row["area_note"].startswith(note), row
    for row in rows.values():  # nothing non-finite anywhere in results.csv
        for key in ("area_cm2", "right_share", "max_prob"):
            assert row[key] == "" or math.isfinite(float(row[key])), (key, row)
    # the untouched spacing of the same image gives its cm²
    real = pydicom.dcmread(predicted["real"], stop_before_pixels=True)
    row = rows["control-name"]
    spacing = [float(v) for v in real.PixelSpacing]
    assert float(row["area_cm2"]) == pytest.approx(
        int(row["area_px"]) * spacing[0] * spacing[1] / 100, abs=5e-5
    )


def test_refused_rows_keep_their_measures(predicted):
    out, rows = predicted["out"], predicted["rows"]
    import cv2

    for case in REFUSED:
        png = cv2.imread(str(out / "masks" / f"{case}.png"), cv2.IMREAD_GRAYSCALE)
        assert int(rows[case]["area_px"]) == int(np.count_nonzero(png))
