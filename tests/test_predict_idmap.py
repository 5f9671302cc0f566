"""`ptxseg predict --kaggle-csv OUT --id-map stage_1_*_images.csv`: the submission's ImageId of
each PNG of the SIIM re-packaging is the SOPInstanceUID the map gives its file name, checked on
the real sample against the map read independently with the csv module."""

from __future__ import annotations

import csv
import shutil

import cv2
import pydicom
import pytest

from ptxseg.postprocess import PostParams
from tests.conftest import make_run
from tests.test_predict import SIZE, read_rows, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run


def _siim_map(sample_dir) -> dict[str, str]:
    out = {}
    for name in ("stage_1_train_images.csv", "stage_1_test_images.csv"):
        with open(sample_dir / name, newline="", encoding="utf-8") as fh:
            out.update({r["new_filename"]: r["ImageId"] for r in csv.DictReader(fh)})
    return out


def test_image_ids_are_the_maps_for_png_files_and_the_uid_for_dicoms(run, sample_dir, tmp_path):
    truth = _siim_map(sample_dir)
    pngs = sorted((sample_dir / "png_images").glob("*.png"))
    train = [p for p in pngs if "_train_" in p.name][:3]
    test = [p for p in pngs if "_test_" in p.name][:2]
    src = tmp_path / "in"
    src.mkdir()
    for p in train + test:
        shutil.copy(p, src / p.name)
    # the same image converted to JPEG: matched by its name without the extension
    jpeg_of = train[0].name.replace(".png", ".jpg")
    (src / "jpeg").mkdir()
    cv2.imwrite(str(src / "jpeg" / jpeg_of), cv2.imread(str(train[0]), 0))
    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    shutil.copy(dicom, src / dicom.name)
    sub = tmp_path / "sub.csv"
    rc, _, err = run_cli([
        "predict", str(run), str(src), "--out", str(tmp_path / "o"), "--kaggle-csv", str(sub),
        "--id-map", str(sample_dir / "stage_1_train_images.csv"),
        "--id-map", str(sample_dir / "stage_1_test_images.csv"), "--no-overlays",
    ])  # fmt: skip
    assert rc == 0, err
    results = read_rows(tmp_path / "o" / "results.csv")
    with open(sub, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    got = [r[0] for r in rows[1:]]
    expected = []
    for r in results:
        name = r["source"].rsplit("/", 1)[-1]
        if name.endswith(".dcm"):
            expected.append(pydicom.dcmread(r["source"], stop_before_pixels=True).SOPInstanceUID)
        elif name.endswith(".jpg"):
            expected.append(truth[name.replace(".jpg", ".png")])
        else:
            expected.append(truth[name])
    assert got == expected and len(got) == 7
    assert len(set(got)) == 6  # the JPEG copy has its PNG's ImageId
    assert not any(g.endswith("_") for g in got)  # no file stem left as an ImageId


def test_files_missing_from_the_map_are_one_error_before_any_work(run, sample_dir, tmp_path):
    pngs = sorted((sample_dir / "png_images").glob("*.png"))
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pngs[0], src / pngs[0].name)
    shutil.copy(pngs[1], src / "renamed.png")
    shutil.copy(pngs[2], src / "other.png")
    out = tmp_path / "o"
    rc, _, err = run_cli([
        "predict", str(run), str(src), "--out", str(out), "--kaggle-csv", str(tmp_path / "s.csv"),
        "--id-map", str(sample_dir / "stage_1_train_images.csv"),
        "--id-map", str(sample_dir / "stage_1_test_images.csv"),
    ])  # fmt: skip
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --id-map ")
    assert "2 of 3 inputs are not in the map" in lines[0]
    assert f"e.g. {src / 'other.png'}" in lines[0]  # the first in input order
    assert not out.exists() and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-kaggle", "--id-map: gives the ImageIds of --kaggle-csv; pass --kaggle-csv too"),
        ("columns", "an id map needs the columns new_filename,ImageId"),
        ("conflict", "line 3: 'a.png' has ImageId 2.2 here but 1.1 at line 2 of"),
    ],
)
def test_unusable_id_maps_are_one_line_errors(run, sample_dir, tmp_path, case, expected):
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    shutil.copy(png, tmp_path / "a.png")
    idmap = tmp_path / "map.csv"
    idmap.write_text({
        "no-kaggle": "new_filename,ImageId\na.png,1.1\n",
        "columns": "fname,mask\na.png,1 2\n",
        "conflict": "new_filename,ImageId,has_pneumo\na.png,1.1,0\na.png,2.2,0\n",
    }[case])  # fmt: skip
    argv = ["predict", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
            "--id-map", str(idmap)]
    if case != "no-kaggle":
        argv += ["--kaggle-csv", str(tmp_path / "s.csv")]
    rc, _, err = run_cli(argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert expected in err
    assert not (tmp_path / "o").exists()
