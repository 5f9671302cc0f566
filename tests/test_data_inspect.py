"""ptxseg inspect: the real sample's counts, problems found and reported, JSON output."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np

from ptxseg.cli import main
from ptxseg.data.inspect import inspect_dataset


def test_sample_counts(sample_dir, capsys):
    report = inspect_dataset(sample_dir)
    assert (report.layout, report.detected) == ("png", True)
    assert (report.images, report.pairs, report.positive, report.negative) == (108, 108, 43, 65)
    assert report.image_sizes == {"1024x1024": 108}
    assert report.bit_depths == {"8": 108} and report.problems == []
    # independent: areas straight from the mask files
    areas = [
        int((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0).sum())
        for p in sorted((sample_dir / "png_masks").glob("*.png"))
    ]
    positive = [a for a in areas if a]
    assert report.mask_area["count"] == 43
    assert report.mask_area["min"] == min(positive) and report.mask_area["max"] == max(positive)
    assert abs(report.mask_area["mean"] - np.mean(positive)) < 1e-6

    from ptxseg.cli.data import _print_inspect  # the CLI's table, without a second full pass

    _print_inspect(report)
    out = capsys.readouterr().out
    for row in ("layout +│ png \\(detected\\)", "pairs .*│ 108 ", "positive +│ 43 ",
                "negative +│ 65 "):
        assert re.search(row, out), row
    assert "no problems found" in out


def _dataset_with_problems(tmp_path):
    img_dir, mask_dir = tmp_path / "png_images", tmp_path / "png_masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    img = np.full((16, 16), 100, np.uint8)
    good = np.zeros((16, 16), np.uint8)
    good[4:8, 4:8] = 255
    for name in ("ok", "nonbin", "small", "trunc", "nomask"):
        cv2.imwrite(str(img_dir / f"{name}.png"), img)
    cv2.imwrite(str(mask_dir / "ok.png"), good)
    nonbin = good.copy()
    nonbin[0, :] = 128  # values {0, 128, 255}
    cv2.imwrite(str(mask_dir / "nonbin.png"), nonbin)
    cv2.imwrite(str(mask_dir / "small.png"), np.zeros((8, 16), np.uint8))
    cv2.imwrite(str(mask_dir / "trunc.png"), good)
    data = (img_dir / "trunc.png").read_bytes()
    (img_dir / "trunc.png").write_bytes(data[: len(data) // 2])
    cv2.imwrite(str(mask_dir / "orphan.png"), good)
    return tmp_path


def test_every_problem_is_reported(tmp_path, capsys):
    root = _dataset_with_problems(tmp_path)
    report = inspect_dataset(root)
    kinds = {p.kind: p for p in report.problems}
    assert set(kinds) == {"missing-mask", "missing-image", "non-binary", "size-mismatch",
                          "unreadable"}
    assert kinds["missing-mask"].path.endswith("nomask.png")
    assert kinds["missing-image"].path.endswith("orphan.png")
    assert kinds["non-binary"].path.endswith("png_masks/nonbin.png")
    assert kinds["size-mismatch"].path.endswith("png_masks/small.png")
    assert kinds["unreadable"].path.endswith("png_images/trunc.png")
    assert report.images == 5 and report.pairs == 4
    assert report.positive == 2 and report.negative == 0  # ok + nonbin; small/trunc unread

    assert main(["inspect", str(root), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == "png" and data["positive"] == 2
    assert {p["kind"] for p in data["problems"]} == set(kinds)

    assert main(["inspect", str(root)]) == 2
    out = capsys.readouterr().out
    assert "5 problem(s)" in out and "orphan.png" in out and "Traceback" not in out


def test_synth_then_inspect_via_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--n", "6", "--size", "64", "--seed", "1",
                 "--positive-fraction", "0.5"]) == 0
    assert "wrote 6 images (3 with a pneumothorax" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "s"), "--layout", "png", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["images"], data["positive"], data["negative"]) == (6, 3, 3)
    assert data["layout_detected"] is False and data["problems"] == []
    # a previous synth's folder: replaced, none of its images left (tests/test_output_folders)
    assert main(["synth", str(tmp_path / "s"), "--n", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "s" / "png_images").iterdir())) == 2


# ---------------------------------------------------------------------- issue 26, item 27


def test_unlabelled_dicoms_are_inspected(sample_dir, capsys):
    """The real sample's dicom/ holds 12 DICOMs and no run-length CSV: inspected, each image
    decoded (sizes and depths against pydicom), none with ground truth, a note saying why;
    exit 0 (new images to check before predicting are not a problem)."""
    import pydicom

    folder = sample_dir / "dicom"
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dicoms = sorted(folder.glob("*.dcm"))
    sizes = {}
    for p in dicoms:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        key = f"{ds.Columns}x{ds.Rows}"
        sizes[key] = sizes.get(key, 0) + 1
    assert (report["layout"], report["images"], report["pairs"]) == ("siim", len(dicoms), 0)
    assert report["no_ground_truth"] == 12 == len(dicoms)
    assert report["image_sizes"] == sizes and report["formats"] == {"DICOM": 12}
    assert report["problems"] == []
    assert report["notes"] == [
        f"{folder}: no run-length CSV (columns ImageId,EncodedPixels or fname,mask): the 12 "
        "DICOMs are inspected without labels"
    ]
    assert main(["inspect", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"no ground truth +│ 12 ", out)
    assert err.strip() == f"note: {report['notes'][0]}"


def test_inspect_says_what_else_a_folder_holds(sample_dir, capsys):
    """The sample is read as the png layout; it also holds 12 DICOMs in dicom/ and two
    run-length CSVs in rle/ (counted here from the folder), which the note names with the
    options that read them. Read as siim, the note names the png layout instead."""
    n_dicoms = len(list((sample_dir / "dicom").glob("*.dcm")))
    rles = sorted(p.relative_to(sample_dir).as_posix() for p in (sample_dir / "rle").glob("*.csv"))
    report = inspect_dataset(sample_dir)
    assert report.notes == [
        f"{sample_dir} also holds {n_dicoms} DICOMs (dicom/) and {len(rles)} run-length CSVs "
        f"({', '.join(rles)}), which the png layout does not read: inspect them with "
        "--layout siim --rle FILE"
    ]
    siim = inspect_dataset(sample_dir, "siim", rle=sample_dir / "rle" / "first-instance-rle.csv")
    n_png = len(list((sample_dir / "png_images").glob("*.png")))
    assert siim.notes == [
        f"{sample_dir} also holds a png layout (png_images/, {n_png} images), which the siim "
        "layout does not read: inspect them with --layout png"
    ]


def test_training_still_needs_the_labels(sample_dir, tmp_path):
    """Only inspect reads unlabelled DICOMs: loading them for training is still refused."""
    import pytest

    from ptxseg.data.sources import load_records
    from ptxseg.errors import DataError

    with pytest.raises(DataError, match="no run-length CSV found"):
        load_records(sample_dir / "dicom")
