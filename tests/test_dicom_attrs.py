"""What a derived DICOM object takes from its source (``ptxseg.dicom_attrs``): values checked
against the VRs of PS3.5 6.2 (the expected values below are the standard's forms, written by
hand), the attribute types against highdicom's copy of PS3.3, the referenced UIDs refused by
name, and the source never changed."""

from __future__ import annotations

import copy
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset

from ptxseg.dicom_attrs import (
    IS_MAX,
    TYPE_1,
    TYPE_2,
    check_referenced_uids,
    clean_source,
    derived_series_number,
    invalid_uids,
    orientation_problem,
    repair_value,
    valid_uid,
)
from ptxseg.errors import DataError

UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize(
    ("vr", "value", "expected"),
    [
        # valid as they stand
        ("AS", "042Y", "042Y"), ("DA", "19010101", "19010101"), ("TM", "000000.00", "000000.00"),
        ("TM", "1230", "1230"), ("DS", "0.143", "0.143"), ("DS", "1e200", "1e200"),
        ("IS", "2147483647", "2147483647"), ("CS", "CHEST", "CHEST"),
        ("PN", "Doe^John", "Doe^John"),
        ("DT", "20200101120000.5+0100", "20200101120000.5+0100"), ("UI", UID, UID),
        # repaired
        ("AS", "42", "042Y"), ("AS", "42y", "042Y"), ("AS", "7 m", "007M"), ("AS", "0042", "042Y"),
        ("DA", "2019-03-04", "20190304"), ("DA", "2019.03.04", "20190304"),
        ("TM", "12:30:05", "123005"), ("TM", "08:15", "0815"),
        ("TM", "12:30:05.1234567", "123005.123456"),
        ("DS", "0.14300000000000002", "0.143"), ("DS", "0.19431099999999998", "0.194311"),
        ("DS", "-0.000000000123456789", "-1.23456789e-10"), ("CS", "m", "M"),
        # dropped
        ("AS", "1000", None), ("AS", "0", None), ("AS", "forty", None),
        ("DA", "2019-02-30", None), ("DA", "20190230", None), ("DA", "1901", None),
        ("TM", "25:00", None), ("TM", "12:60", None), ("DS", "nan", None), ("DS", "inf", None),
        ("DS", "1e999", None), ("DS", "1,5", None), ("IS", "2147483648", None), ("IS", "1.5", None),
        ("CS", "A-B", None), ("PN", "Doe\x1b[31m\x07\x00\r\nJohn", None), ("PN", "A=B=C=D", None),
        ("PN", "x" * 65, None), ("LO", "x" * 65, None), ("SH", "x" * 17, None),
        ("LO", "tab\there", None), ("LT", "two\r\nlines\tok", "two\r\nlines\tok"),
        ("LT", "bell\x07", None), ("UI", "1.2.03", None), ("UI", "1.2." + "3" * 66, None),
        ("UI", "1.2.a", None), ("DT", "20201301", None),
    ],
)  # fmt: skip
def test_values_against_their_vr(vr, value, expected):
    assert repair_value(vr, value) == expected


def test_valid_uid_follows_ps3_5_9_1():
    assert valid_uid("0.1.2") and valid_uid("1." + "2" * 62)  # 64 characters
    assert not valid_uid("1." + "2" * 63)  # 65
    for bad in ("", "1..2", "1.2.", ".1", "01.2", "1.02", "1.2 ", "1.2.a"):
        assert not valid_uid(bad), bad


def test_type_tables_match_the_standard():
    """TYPE_1 / TYPE_2 are the Type 1(C) / 2(C) root attributes of the modules of the Patient
    and Study entities, as highdicom's tables of PS3.3 list them (the UIDs aside)."""
    std = pytest.importorskip("highdicom._standard_utils")
    modules = std.get_module_attribute_map()
    keys = ("patient", "clinical-trial-subject", "general-study", "patient-study",
            "clinical-trial-study")  # fmt: skip
    by_type: dict[str, set[str]] = {"1": set(), "2": set()}
    for key in keys:
        for attr in modules[key]:
            if not attr["path"] and attr["type"][0] in by_type:
                by_type[attr["type"][0]].add(attr["keyword"])
    assert by_type["1"] - {"StudyInstanceUID"} == TYPE_1
    assert by_type["2"] == TYPE_2 - {"PatientOrientation"}
    image = {a["keyword"]: a["type"] for a in modules["general-image"] if not a["path"]}
    assert image["PatientOrientation"] == "2C"


def _source(**attrs) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = UID + ".3"
    ds.StudyInstanceUID = UID + ".1"
    ds.SeriesInstanceUID = UID + ".2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid values it is given
        for key, value in attrs.items():
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"StudyInstanceUID": ""}, "StudyInstanceUID (0020,000D) is empty"),
        ({"SeriesInstanceUID": "  "}, "SeriesInstanceUID (0020,000E) is empty"),
        ({"SOPInstanceUID": "1.2." + "3" * 66},
         f"SOPInstanceUID (0008,0018) '{('1.2.' + '3' * 66)[:48]}...' is not a valid UID "
         "(70 characters, at most 64)"),
        ({"SOPClassUID": "1.2.840.x"},
         "SOPClassUID (0008,0016) '1.2.840.x' is not a valid UID (digits and dots, no leading "
         "zero)"),
        ({"FrameOfReferenceUID": "1.02"}, "FrameOfReferenceUID (0020,0052) '1.02' is not a valid"),
    ],
)  # fmt: skip
def test_referenced_uids_are_refused_by_name(attrs, message):
    with pytest.raises(DataError) as err:
        clean_source(_source(**attrs), name="x.dcm")
    assert str(err.value).startswith(f"x.dcm: {message}")
    assert str(err.value).endswith(": the DICOM SEG must reference it (Type 1), no DICOM SEG "
                                   "is written")  # fmt: skip
    missing = _source()
    del missing.SeriesInstanceUID
    with pytest.raises(DataError, match=r"^y: SeriesInstanceUID \(0020,000E\) is missing: the "
                       r"DICOM SR must"):  # fmt: skip
        check_referenced_uids(missing, "y", product="DICOM SR")


def test_clean_source_repairs_drops_and_never_changes_the_source():
    item = _source(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                   ReferencedSOPInstanceUID="1.2." + "3" * 66)  # fmt: skip
    coded = Dataset()
    coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = "1", "99X", "x"
    coded.ContextGroupExtensionCreatorUID = "1.2.3"
    src = _source(
        PatientName="Doe\x07", PatientID="P1", PatientAge="42", PatientSex="m",
        StudyDate="2019-03-04", StudyTime="25:61", StudyDescription="bad\x00",
        PatientOrientation=["A", "P"], SeriesNumber="7", FrameOfReferenceUID="",
        ReferencedStudySequence=[item], ProcedureCodeSequence=[coded],
        SpecificCharacterSet="LATIN-9",
    )  # fmt: skip
    src.add_new(0x00091001, "LO", "private")
    src.add_new(0x00280106, "US or SS", b"\x01\x00")  # as an implicit-VR file leaves it
    src.PixelData = b"\0" * 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid values, copied
        before = copy.deepcopy(src)
    clean = clean_source(src)
    assert src == before  # a copy was cleaned
    out = clean.dataset
    assert (out.PatientName, out.PatientID, out.PatientAge, out.PatientSex) == (
        "", "P1", "042Y", "M"
    )
    assert (out.StudyDate, out.StudyTime, out.PatientOrientation) == ("20190304", "", "")
    assert "StudyDescription" not in out  # Type 3: left out
    assert "ReferencedStudySequence" not in out and "FrameOfReferenceUID" not in out
    assert out.ProcedureCodeSequence[0].CodeValue == "1"  # a valid sequence is kept
    assert "PixelData" not in out and 0x00091001 not in out and 0x00280106 in out
    assert out.SpecificCharacterSet == "ISO_IR 192" and out.SeriesNumber == 7
    changes = {c.keyword: c for c in clean.changes}
    assert changes["PatientAge"].describe() == (
        "PatientAge (0010,1010) '42': invalid for AS, written '042Y'"
    )
    assert changes["PatientName"].describe() == (
        "PatientName (0010,0010) 'Doe\\x07': invalid for PN, emptied"
    )
    assert changes["StudyDescription"].after is None
    assert changes["PatientOrientation"].reason == "rows and columns along the same axis"
    assert set(changes) == {"PatientName", "PatientAge", "PatientSex", "StudyDate", "StudyTime",
                            "StudyDescription", "PatientOrientation", "FrameOfReferenceUID",
                            "ReferencedStudySequence", "SpecificCharacterSet"}  # fmt: skip
    assert invalid_uids(out) == []


def test_an_invalid_type_1_attribute_refuses_the_source():
    src = _source(ClinicalTrialSponsorName="x\x00y")
    with pytest.raises(DataError, match=r"^s: ClinicalTrialSponsorName \(0012,0010\) 'x\\x00y' "
                       r"is invalid for LO: the DICOM SEG must copy it \(Type 1\)"):  # fmt: skip
        clean_source(src, name="s")


def test_orientation_and_series_number():
    assert orientation_problem(["L", "F"]) is None and orientation_problem(["RA", "FL"]) is None
    assert orientation_problem(["L"]) == "1 value(s), 2 needed"
    assert orientation_problem(["LR", "F"]) == "'LR' is not a patient direction"
    assert orientation_problem(["X", "F"]) == "'X' is not a patient direction"
    assert orientation_problem(["H", "F"]) == "rows and columns along the same axis"
    assert IS_MAX == 2147483647
    assert derived_series_number(_source(SeriesNumber=1)) == 1001
    assert derived_series_number(_source(SeriesNumber=IS_MAX - 1000)) == IS_MAX
    assert derived_series_number(_source(SeriesNumber=IS_MAX)) == 1000
    assert derived_series_number(_source(SeriesNumber=-5000)) == 1000
    assert derived_series_number(_source()) == 1000


def test_invalid_uids_looks_into_sequences():
    ds = _source(ReferencedSeriesSequence=[_source(ReferencedSOPInstanceUID="1.02")])
    assert invalid_uids(ds) == ["ReferencedSeriesSequence[0].ReferencedSOPInstanceUID '1.02'"]


def test_the_real_sources_changes(sample_dir):
    """The SIIM DICOMs: their age repaired, their 19-character spacing rewritten; nothing else
    changed."""
    for path in sorted((sample_dir / "dicom").glob("*.dcm")):
        src = pydicom.dcmread(path, stop_before_pixels=True)
        changes = {c.keyword: c.after for c in clean_source(src).changes}
        assert changes.pop("PatientAge") == f"'0{src.PatientAge}Y'"
        spacing = src["PixelSpacing"].value
        if len(spacing[0].original_string) > 16:
            assert changes.pop("PixelSpacing") == "'{0:g}\\{0:g}'".format(float(spacing[0]))
        assert changes == {}
