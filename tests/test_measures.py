"""Lesion measures: cm² from the DICOM's spacing (checked by hand against a real SIIM DICOM),
the reason when there is none, and the patient's side on hand-built masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pydicom
import pytest

from ptxseg.measures import (
    MEASURE_COLUMNS,
    Geometry,
    LesionMeasures,
    geometry_from_dataset,
    measure,
    read_geometry,
    right_share,
    side_of,
)

STANDARD = Geometry()  # non-DICOM: patient's right on the image's left


def _real(sample_dir):
    return sorted((sample_dir / "dicom").glob("*.dcm"))


def test_cm2_by_hand_against_a_real_dicom(sample_dir):
    path = _real(sample_dir)[1]  # spacing 0.194311 mm
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    rows, cols = int(ds.Rows), int(ds.Columns)
    assert (rows, cols) == (1024, 1024) and row_mm == pytest.approx(0.194311)
    mask = np.zeros((rows, cols), np.uint8)
    mask[100:300, 200:350] = 1  # 200 rows x 150 columns
    # by hand: 200 * 0.194311 mm = 38.8622 mm high, 150 * 0.194311 = 29.14665 mm wide,
    # 38.8622 * 29.14665 = 1132.70 mm2 = 11.3270 cm2
    by_hand_cm2 = (200 * row_mm / 10) * (150 * col_mm / 10)
    assert by_hand_cm2 == pytest.approx(11.3270, abs=1e-4)
    geo = read_geometry(path)
    m = measure(mask, geo, max_prob=0.91)
    assert m.area_px == 30000
    assert m.area_cm2 == pytest.approx(by_hand_cm2, rel=1e-12)
    assert m.area_note.startswith("from PixelSpacing 0.194311 x 0.194311 mm")
    # SIIM's 1024 px at 0.19 mm is 19.9 cm across: flagged, the figure kept
    assert "spans only 19.9 x 19.9 cm" in m.area_note
    assert m.max_prob == 0.91
    # the same region on a half-size mask: same cm², pixels of the mask
    half = measure(mask[::2, ::2], geo)
    assert half.area_px == 7500 and half.area_cm2 == pytest.approx(by_hand_cm2, rel=1e-12)
    assert "mask 512x512 px scaled to the image's 1024x1024" in half.area_note
    row = dict(zip(MEASURE_COLUMNS, m.row(), strict=True))
    assert row["area_px"] == "30000" and row["area_cm2"] == f"{by_hand_cm2:.4f}"
    assert row["side"] == "right" and row["max_prob"] == "0.910000"


def test_spacing_tags_and_reasons(tmp_path, make_dicom, sample_dir):
    px = np.zeros((400, 300), np.uint8)
    mask = np.zeros((400, 300), np.uint8)
    mask[:10, :20] = 1  # 200 px
    imager = make_dicom(tmp_path / "dx.dcm", px, ImagerPixelSpacing=[0.5, 0.4])
    m = measure(mask, read_geometry(imager))
    assert m.area_cm2 == pytest.approx(200 * 0.5 * 0.4 / 100)
    assert "ImagerPixelSpacing (at the detector, not corrected for magnification)" in m.area_note
    assert "spans only 12.0 x 20.0 cm" in m.area_note  # 300 x 0.4 mm wide, 400 x 0.5 high
    mag = make_dicom(tmp_path / "mag.dcm", px, ImagerPixelSpacing=[0.5, 0.4],
                     EstimatedRadiographicMagnificationFactor=1.25)
    m = measure(mask, read_geometry(mag))
    assert m.area_cm2 == pytest.approx(200 * (0.5 / 1.25) * (0.4 / 1.25) / 100)
    assert "EstimatedRadiographicMagnificationFactor 1.25" in m.area_note
    both = make_dicom(tmp_path / "both.dcm", px, PixelSpacing=[0.7, 0.7],
                      ImagerPixelSpacing=[0.5, 0.4])
    assert measure(mask, read_geometry(both)).area_cm2 == pytest.approx(200 * 0.49 / 100)
    none = make_dicom(tmp_path / "none.dcm", px)
    m = measure(mask, read_geometry(none))
    assert m.area_cm2 is None and m.area_px == 200
    assert m.area_note == "no PixelSpacing or ImagerPixelSpacing in the DICOM header"
    assert m.row()[1] == ""
    bad = make_dicom(tmp_path / "bad.dcm", px, PixelSpacing=[0, 0.1])
    assert read_geometry(bad).spacing_mm is None
    assert "PixelSpacing not usable" in read_geometry(bad).spacing_note
    png = sample_dir / "png_images" / "0_train_0_.png"
    m = measure(mask, read_geometry(png))
    assert m.area_cm2 is None and m.area_note == "no pixel spacing (.png image)"


def test_small_field_of_view_is_flagged(tmp_path, make_dicom):
    px = np.zeros((1000, 1000), np.uint8)
    wide = make_dicom(tmp_path / "wide.dcm", px, PixelSpacing=[0.35, 0.35])  # 35 cm
    narrow = make_dicom(tmp_path / "narrow.dcm", px, PixelSpacing=[0.15, 0.15])  # 15 cm
    assert "spans only" not in read_geometry(wide).spacing_note
    assert "spans only 15.0 x 15.0 cm" in read_geometry(narrow).spacing_note


def _blob(mask, r0, r1, c0, c1):
    mask[r0:r1, c0:c1] = 1
    return mask


def test_sides_on_hand_built_masks():
    z = np.zeros((100, 100), np.uint8)
    # standard display: image left = patient's right
    left_blob = _blob(z.copy(), 10, 40, 10, 30)
    assert measure(left_blob).side == "right" and measure(left_blob).right_share == 1.0
    right_blob = _blob(z.copy(), 10, 40, 70, 90)
    assert measure(right_blob).side == "left" and measure(right_blob).right_share == 0.0
    both = _blob(left_blob.copy(), 10, 40, 70, 90)  # 600 px each side
    m = measure(both)
    assert m.side == "both" and m.right_share == 0.5
    # a speck on the other side (< 10 % of the area) does not make it bilateral
    speck = _blob(left_blob.copy(), 50, 52, 80, 82)  # 4 px vs 600
    assert measure(speck).side == "right"
    assert measure(speck).right_share == pytest.approx(600 / 604)
    # a lesion crossing the midline goes whole to the side of its centroid
    crossing = _blob(z.copy(), 20, 60, 30, 60)  # columns 30..59, centroid 44.5 < 49.5
    assert measure(crossing).side == "right" and measure(crossing).right_share == 1.0
    # centred exactly on the midline: half to each side
    centred = _blob(z.copy(), 20, 60, 40, 60)  # columns 40..59, centroid 49.5
    assert right_share(centred) == 0.5 and measure(centred).side == "both"
    empty = measure(z)
    assert (empty.side, empty.right_share, empty.area_px) == ("none", None, 0)
    assert side_of(0.95) == "right" and side_of(0.05) == "left" and side_of(0.5) == "both"


def test_orientation_from_tags(tmp_path, make_dicom):
    px = np.zeros((100, 100), np.uint8)
    left_blob = _blob(np.zeros((100, 100), np.uint8), 10, 40, 10, 30)  # image left

    def side(**attrs):
        geo = read_geometry(make_dicom(tmp_path / "x.dcm", px, **attrs))
        return measure(left_blob, geo).side, geo.side_basis

    assert side(PatientOrientation=["L", "F"]) == (
        "right", "PatientOrientation L\\F: rows run to the patient's left"
    )
    s, basis = side(PatientOrientation=["R", "F"])  # mirrored image
    assert s == "left" and "mirror of the standard display" in basis
    s, basis = side(ViewPosition="AP")
    assert s == "right" and basis.startswith("ViewPosition AP, no PatientOrientation: standard")
    s, basis = side(ViewPosition="PA", PatientOrientation="")
    assert s == "right" and basis.startswith("ViewPosition PA")
    s, basis = side(ViewPosition="LL")
    assert s == "n/a" and "lateral view" in basis
    s, basis = side(PatientOrientation=["P", "L"])  # turned 90 degrees
    assert s == "n/a" and "turned" in basis
    s, basis = side()
    assert s == "right" and basis.startswith("no PatientOrientation or ViewPosition")


def test_real_siim_headers(sample_dir):
    """All 12 real DICOMs: spacing read, PA/AP view, no PatientOrientation."""
    for path in _real(sample_dir):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        geo = read_geometry(path)
        assert geo.spacing_mm == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        assert geo.shape == (1024, 1024) and geo.right_on_image_left is True
        assert geo.side_basis.startswith(f"ViewPosition {ds.ViewPosition}, no PatientOrientation")


def _header(**attrs):
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = 1024, 1024
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_absurd_spacing_gives_no_cm2_and_nothing_non_finite():
    """Issue 26: PixelSpacing 1e200 gave area_cm2 = inf (and a 500 from the service's JSON),
    1e-300 gave 0.0000 for a 154,080 px lesion, a magnification factor of 1e-300 the same."""
    lesion = np.zeros((1024, 1024), np.uint8)
    lesion[100:421, 200:680] = 1  # 321 x 480
    assert int(lesion.sum()) == 154_080
    cases = {
        "PixelSpacing 1e+200 x 1e+200 mm outside the plausible 0.02-5 mm":
            dict(PixelSpacing=[1e200, 1e200]),
        "PixelSpacing 1e-300 x 1e-300 mm outside the plausible 0.02-5 mm":
            dict(PixelSpacing=[1e-300, 1e-300]),
        "PixelSpacing 0.000143 x 0.000143 mm outside": dict(PixelSpacing=[0.000143, 0.000143]),
        "PixelSpacing 143 x 143 mm outside": dict(PixelSpacing=[143, 143]),
        "EstimatedRadiographicMagnificationFactor 1e-300 outside the plausible 1-3: no cm²":
            dict(ImagerPixelSpacing=[0.143, 0.143],
                 EstimatedRadiographicMagnificationFactor=1e-300),
        "EstimatedRadiographicMagnificationFactor 0 outside the plausible 1-3":
            dict(ImagerPixelSpacing=[0.143, 0.143], EstimatedRadiographicMagnificationFactor=0),
        "ImagerPixelSpacing 1e+200 x 1e+200 mm outside":
            dict(ImagerPixelSpacing=[1e200, 1e200], EstimatedRadiographicMagnificationFactor=1.1),
        "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor 3 0.0166667 x 0.0166667 "
        "mm outside": dict(ImagerPixelSpacing=[0.05, 0.05],
                           EstimatedRadiographicMagnificationFactor=3),
    }  # fmt: skip
    for note, attrs in cases.items():
        m = measure(lesion, geometry_from_dataset(_header(**attrs)), max_prob=0.9)
        assert m.area_cm2 is None and m.area_note.startswith(note), (note, m.area_note)
        assert m.area_px == 154_080 and m.row()[1] == ""
        json.dumps(m.to_dict(), allow_nan=False)  # the service's answer: valid JSON
    # the bounds are accepted (by hand: 154,080 px x 0.02 mm x 0.02 mm = 61.632 mm² = 0.61632
    # cm²; x 5 mm x 5 mm = 3,852,000 mm² = 38,520 cm²)
    for spacing, by_hand in ((0.02, 0.61632), (5.0, 38520.0)):
        m = measure(lesion, geometry_from_dataset(_header(PixelSpacing=[spacing, spacing])))
        assert m.area_cm2 == pytest.approx(by_hand)
    m = measure(lesion, geometry_from_dataset(_header(
        ImagerPixelSpacing=[0.15, 0.15], EstimatedRadiographicMagnificationFactor=3)))  # fmt: skip
    assert m.area_cm2 == pytest.approx(154_080 * 0.05 * 0.05 / 100)


def test_measures_are_never_non_finite():
    from ptxseg.errors import PtxsegError

    with pytest.raises(PtxsegError, match=r"probabilities are not finite \(max nan\)"):
        measure(np.ones((4, 4), np.uint8), max_prob=float("nan"))
    with pytest.raises(ValueError, match=r"LesionMeasures.area_cm2 inf is not finite"):
        LesionMeasures(1, math.inf, "", "right", 1.0, "", 0.5)
