"""The clinical outputs end to end (issue 14): ``predict --dicom-seg`` on the 12 real SIIM
DICOMs read back with highdicom and pydicom, lesion measures in results.csv and per_image.csv
checked by hand against the DICOMs' PixelSpacing, and evaluate's bootstrap confidence
intervals against :func:`ptxseg.metrics.bootstrap_cis` of its own per-image counts."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest

from ptxseg.postprocess import PostParams
from tests.conftest import make_run, write_dicom
from tests.dicom_util import DOC, KNOWN_WARNINGS, dciodvfy, unexplained, validate  # noqa: F401
from tests.test_predict import SIZE, read_rows, run_cli

NOT_DICOM_NOTE = "not a DICOM input: no DICOM SEG"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mask_png(out: Path, ident: str) -> np.ndarray:
    png = cv2.imread(str(out / "masks" / f"{ident}.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and set(np.unique(png)) <= {0, 255}
    return (png // 255).astype(np.uint8)


def _cm2_by_hand(dicom: Path, area_px: int) -> float:
    """Area in cm² from the DICOM's PixelSpacing (row, column spacing in mm)."""
    ds = pydicom.dcmread(dicom, stop_before_pixels=True)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return area_px * row_mm * col_mm / 100.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clinical") / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


@pytest.fixture(scope="module")
def predicted(sample_dir, run, tmp_path_factory):
    """``predict --dicom-seg`` over the 12 real DICOMs and one PNG."""
    root = tmp_path_factory.mktemp("seg")
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    out = root / "out"
    rc, stdout, stderr = run_cli(["predict", str(run), str(sample_dir / "dicom"), str(png),
                                  "--out", str(out), "--dicom-seg"])
    assert rc == 0, stderr
    return {"out": out, "png": png, "stdout": stdout,
            "rows": {Path(r["source"]).name: r for r in read_rows(out / "results.csv")}}


def test_dicom_seg_of_each_real_dicom_reads_back(sample_dir, run, predicted):
    out, rows = predicted["out"], predicted["rows"]
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))
    assert len(dicoms) == 12
    assert "dicom_seg/" in predicted["stdout"]
    sha = _sha256(run / "best.ckpt")
    areas = []
    for path in dicoms:
        row = rows[path.name]
        assert row["status"] == "ok" and row["dicom_seg_note"] == ""
        assert row["dicom_seg"] == f"dicom_seg/{row['id']}.dcm"
        src = pydicom.dcmread(path, stop_before_pixels=True)
        mask = _mask_png(out, row["id"])
        assert mask.shape == (src.Rows, src.Columns)
        areas.append(int(mask.sum()))

        seg = hd.seg.segread(out / row["dicom_seg"])
        assert seg.get_source_image_uids() == [
            (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)
        ]
        assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        frames = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])
        assert frames.shape == (1, src.Rows, src.Columns, 1)
        np.testing.assert_array_equal(frames[0, ..., 0], mask)
        np.testing.assert_array_equal(pydicom.dcmread(out / row["dicom_seg"]).pixel_array, mask)
        algo = seg.get_segment_description(1).algorithm_identification[0]
        params = dict(item.split("=", 1) for item in algo.AlgorithmParameters.split(","))
        assert params["run"] == run.name and params["checkpoint_sha256"] == sha
        assert params["binary_threshold"] == "0.5" and params["tta"] == "none"
    # the test network's masks are neither all empty nor all full: the frames say something
    assert any(areas) and not all(a == 1024 * 1024 for a in areas)
    assert len(list((out / "dicom_seg").iterdir())) == 12  # no SEG for the PNG, no temp file
    info = json.loads((out / "predict.json").read_text())
    assert info["dicom_seg"] is True and info["overlay_style"] == "fill"


def test_every_real_seg_passes_dciodvfy(sample_dir, predicted, dciodvfy):  # noqa: F811
    """dicom3tools' validator finds no Error in the SEG of any of the 12 real DICOMs, and only
    the warnings docs/clinical-outputs.md explains. The sources' own invalid values (PatientAge
    ``NN`` where AS needs ``NNNY``) are repaired, and PatientOrientation (Type 2C) is there."""
    out, rows = predicted["out"], predicted["rows"]
    doc = DOC.read_text(encoding="utf-8")
    assert all(phrase in doc for phrase in KNOWN_WARNINGS)
    for path in sorted((sample_dir / "dicom").glob("*.dcm")):
        seg_path = out / rows[path.name]["dicom_seg"]
        errors, warnings = validate(dciodvfy, seg_path)
        assert errors == [], (path.name, errors)
        assert unexplained(warnings) == [], (path.name, warnings)
        src = pydicom.dcmread(path, stop_before_pixels=True)
        seg = pydicom.dcmread(seg_path)
        assert len(src.PatientAge) == 2 and seg.PatientAge == f"0{src.PatientAge}Y"
        assert src.PatientOrientation == "" and seg["PatientOrientation"].value == ""
        # the source's own dciodvfy errors, for the record: the SEG copies none of them
        src_errors, _ = validate(dciodvfy, path)
        assert any("Patient's Age" in e for e in src_errors)


def test_a_png_gets_a_note_instead_of_a_seg(predicted):
    row = predicted["rows"][predicted["png"].name]
    assert row["status"] == "ok"
    assert (row["dicom_seg"], row["dicom_seg_note"]) == ("", NOT_DICOM_NOTE)
    assert row["area_cm2"] == "" and row["area_note"] == "no pixel spacing (.png image)"


def test_results_cm2_is_the_area_times_pixel_spacing(sample_dir, predicted):
    """cm² of every DICOM row against PixelSpacing read with pydicom; one positive DICOM is
    the figure checked by hand (area_px of the mask PNG x row mm x column mm / 100)."""
    out, rows = predicted["out"], predicted["rows"]
    checked = 0
    for path in sorted((sample_dir / "dicom").glob("*.dcm")):
        row = rows[path.name]
        area = int(_mask_png(out, row["id"]).sum())
        assert int(row["area_px"]) == area
        assert float(row["area_cm2"]) == pytest.approx(_cm2_by_hand(path, area), abs=5e-5)
        assert row["area_note"].startswith("from PixelSpacing ")
        assert (row["side"] == "none") == (area == 0)
        assert row["side_basis"].startswith("ViewPosition ")
        checked += area > 0
    assert checked > 0
    # one DICOM by hand: its header says PixelSpacing 0.14300000000000002 \ same, in mm
    first = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    row = rows[first.name]
    spacing = pydicom.dcmread(first, stop_before_pixels=True)["PixelSpacing"].value
    assert [str(v) for v in spacing] == ["0.14300000000000002"] * 2
    area = int(row["area_px"])
    assert area > 0
    by_hand = area * 0.14300000000000002 * 0.14300000000000002 / 100  # mm² -> cm²
    assert float(row["area_cm2"]) == pytest.approx(by_hand, abs=5e-5)


def test_a_dicom_without_a_seg_is_a_failed_row_with_its_mask(sample_dir, run, tmp_path):
    """A DICOM highdicom cannot derive a SEG from (no Study / Series Instance UID): its row
    keeps the mask and measures, its status says why, the others are written, exit code 2."""
    src = tmp_path / "in"
    src.mkdir()
    gray = cv2.imread(str(sorted((sample_dir / "png_images").glob("*.png"))[1]), 0)
    write_dicom(src / "nouid.dcm", cv2.resize(gray, (128, 128)), PixelSpacing=[0.5, 0.5])
    real = sorted((sample_dir / "dicom").glob("*.dcm"))[3]
    shutil.copy(real, src / real.name)
    out = tmp_path / "out"
    rc, _, err = run_cli(["predict", str(run), str(src), "--out", str(out), "--dicom-seg"])
    assert rc == 2
    rows = {Path(r["source"]).name: r for r in read_rows(out / "results.csv")}
    bad = rows["nouid.dcm"]
    reason = ("StudyInstanceUID (0020,000D) is missing: the DICOM SEG must reference it "
              "(Type 1), no DICOM SEG is written")
    assert bad["status"] == f"error: DICOM SEG not written: {reason}"
    assert bad["dicom_seg"] == "" and bad["dicom_seg_note"] == reason
    area = int(_mask_png(out, bad["id"]).sum())
    assert int(bad["area_px"]) == area
    assert float(bad["area_cm2"]) == pytest.approx(area * 0.25 / 100, abs=5e-5)
    assert f"warning: {src / 'nouid.dcm'}: DICOM SEG not written" in err
    assert "error: 1 of 2 files failed" in err
    good = rows[real.name]
    assert good["status"] == "ok" and (out / good["dicom_seg"]).is_file()
    assert sorted(p.name for p in (out / "dicom_seg").iterdir()) == [f"{good['id']}.dcm"]


def test_seg_files_follow_the_output_rules(sample_dir, run, tmp_path):
    """A SEG this run would write over a file no predict wrote is refused before any work
    (``--overwrite`` replaces it); predicting again without ``--dicom-seg`` clears the
    previous run's SEGs."""
    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    out = tmp_path / "out"
    foreign = out / "dicom_seg" / f"{dicom.stem}.dcm"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's file")
    args = ["predict", str(run), str(dicom), "--out", str(out), "--dicom-seg"]
    rc, _, err = run_cli(args)
    assert rc == 2 and "1 file this run would write already exists and was not written by a "\
        "previous ptxseg predict" in err
    assert f"e.g. {foreign}" in err and "--overwrite to replace" in err
    assert foreign.read_bytes() == b"someone else's file" and not (out / "masks").exists()
    rc, _, err = run_cli([*args, "--overwrite"])
    assert rc == 0, err
    assert hd.seg.segread(foreign).get_source_image_uids()[0][2] == dicom.stem
    rc, _, err = run_cli(["predict", str(run), str(dicom), "--out", str(out)])
    assert rc == 0, err
    assert not foreign.exists() and (out / "masks" / f"{dicom.stem}.png").exists()
    row = read_rows(out / "results.csv")[0]
    assert (row["dicom_seg"], row["dicom_seg_note"]) == ("", "")
    assert json.loads((out / "predict.json").read_text())["dicom_seg"] is False


def test_onnx_backend_identifies_the_onnx_file(sample_dir, run, tmp_path):
    from ptxseg.export import export_run

    onnx = export_run(run, tmp_path / "model.onnx").path
    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[5]
    out = tmp_path / "out"
    rc, _, err = run_cli(["predict", str(run), str(dicom), "--out", str(out), "--dicom-seg",
                          "--backend", "onnx", "--model", str(onnx)])
    assert rc == 0, err
    seg = hd.seg.segread(out / "dicom_seg" / f"{dicom.stem}.dcm")
    algo = seg.get_segment_description(1).algorithm_identification[0]
    assert f"checkpoint_sha256={_sha256(onnx)}" in algo.AlgorithmParameters
    np.testing.assert_array_equal(
        seg.get_pixels_by_source_instance([dicom.stem], segment_numbers=[1])[0, ..., 0],
        _mask_png(out, dicom.stem),
    )


def test_overlay_style_outline_leaves_the_region_untinted(sample_dir, run, tmp_path):
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    outs = {}
    for style in ("fill", "outline"):
        outs[style] = tmp_path / style
        rc, _, err = run_cli(["predict", str(run), str(png), "--out", str(outs[style]),
                              "--overlay-style", style])
        assert rc == 0, err
    ident = png.stem
    mask = _mask_png(outs["fill"], ident)
    gray = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    inside = cv2.erode(mask, np.ones((15, 15), np.uint8), borderType=cv2.BORDER_CONSTANT,
                       borderValue=0).astype(bool)
    assert inside.sum() > 1000
    fill, outline = (cv2.imread(str(outs[s] / "overlays" / f"{ident}.png"))[: gray.shape[0]]
                     for s in ("fill", "outline"))
    for c in range(3):
        np.testing.assert_array_equal(outline[..., c][inside], gray[inside])
    assert (fill[..., 2][inside].astype(int) > fill[..., 0][inside]).all()  # tinted
    rc, _, err = run_cli(["predict", str(run), str(png), "--out", str(tmp_path / "x"),
                          "--overlay-style", "dotted"])
    assert rc == 2 and err == "error: --overlay-style: unknown 'dotted' (valid: fill, outline)\n"


# ---------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def siim_dicom(sample_dir, tmp_path_factory):
    """The 12 real DICOMs in the SIIM layout, with a run-length CSV from the one real mask."""
    from ptxseg.data.imageio import read_mask
    from ptxseg.data.rle import encode

    root = tmp_path_factory.mktemp("siim") / "siim-dicom"
    rows = []
    for path in sorted((sample_dir / "dicom").glob("*.dcm")):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / path.name).symlink_to(path)
        mask_png = sample_dir / "dicom_masks" / f"{path.stem}.png"
        rows.append((path.stem, encode(read_mask(mask_png, (1024, 1024)))
                     if mask_png.exists() else "-1"))
    with open(root / "train-rle.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def evaluated(run, siim_dicom, tmp_path_factory):
    import ptxseg.figures as figures

    out = tmp_path_factory.mktemp("ev") / "out"
    seen = []
    original = figures.make_panel

    def spy(image, gt, pred, stats, geometry=None):
        seen.append(geometry)
        return original(image, gt, pred, stats, geometry)

    mp = pytest.MonkeyPatch()
    mp.setattr(figures, "make_panel", spy)
    try:
        rc, stdout, err = run_cli(["evaluate", str(run), "--data", str(siim_dicom), "--out",
                                   str(out)])
    finally:
        mp.undo()
    assert rc == 0, err
    return {"out": out, "stdout": stdout, "panel_geometries": seen}


def test_per_image_cm2_and_side_from_the_dicoms(sample_dir, evaluated):
    rows = read_rows(evaluated["out"] / "per_image.csv")
    assert len(rows) == 12
    for r in rows:
        dicom = sample_dir / "dicom" / f"{r['id']}.dcm"
        area = int(r["predicted_area"])
        assert float(r["area_cm2"]) == pytest.approx(_cm2_by_hand(dicom, area), abs=5e-5)
        assert r["area_note"].startswith("from PixelSpacing ")
        assert "the image spans only" in r["area_note"]  # the SIIM spacing caveat
        assert (r["side"] == "none") == (area == 0)
        assert r["side_basis"].startswith("ViewPosition ")
    # the report's case panels got each image's geometry (captions in cm²)
    geos = evaluated["panel_geometries"]
    assert geos and all(g is not None and g.spacing_mm is not None for g in geos)


def test_confidence_intervals_equal_a_bootstrap_of_the_per_image_counts(evaluated):
    from ptxseg.metrics import ImageStats, bootstrap_cis
    from ptxseg.report import ci_text

    m = json.loads((evaluated["out"] / "metrics.json").read_text())
    rows = read_rows(evaluated["out"] / "per_image.csv")
    stats = [
        ImageStats(r["id"], int(r["tp"]), int(r["fp"]), int(r["fn"]),
                   1024 * 1024 - int(r["tp"]) - int(r["fp"]) - int(r["fn"]), float(r["max_prob"]))
        for r in rows
    ]
    cis = m["confidence_intervals"]
    assert cis == json.loads(json.dumps(bootstrap_cis(stats)))
    assert cis["seed"] == 0 and cis["n_resamples"] == 2000 and cis["level"] == 0.95
    lo, hi = cis["intervals"]["per_image.kaggle_dice"]
    assert lo <= m["per_image"]["kaggle_dice"] <= hi
    # the terminal table shows them
    assert ci_text(m, "per_image", "kaggle_dice") in evaluated["stdout"]
    assert "95% CI" in evaluated["stdout"]


def test_each_dicom_header_is_read_once(sample_dir, run, tmp_path, monkeypatch):
    """The measures and the SEG take the header read with the pixels: one read per DICOM."""
    import collections

    import ptxseg.data.imageio as imageio
    from ptxseg.predict import predict

    reads = collections.Counter()
    original = imageio.open_regular  # every image and header read opens its file through it

    def counting(path):
        reads[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(imageio, "open_regular", counting)
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))[:3]
    summary = predict(run, dicoms, tmp_path / "out", dicom_seg=True, workers=0, progress=False)
    assert summary.n_errors == 0
    assert reads == {p.name: 1 for p in dicoms}
    assert len(list((tmp_path / "out" / "dicom_seg").iterdir())) == 3
