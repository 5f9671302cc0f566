"""Bad input, one test each: a one-line message naming the file, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ptxseg.cli import main
from ptxseg.data.imageio import read_image
from ptxseg.data.sources import load_records
from ptxseg.errors import DataError


def _inspect_json(capsys, root, *extra):
    code = main(["inspect", str(root), "--json", *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, json.loads(captured.out)


def _one_problem(data, kind):
    found = [p for p in data["problems"] if p["kind"] == kind]
    assert len(found) == 1, data["problems"]
    assert "\n" not in found[0]["problem"]
    return found[0]


def _png_pair(root, name, image, mask):
    (root / "png_images").mkdir(parents=True, exist_ok=True)
    (root / "png_masks").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "png_images" / name), image)
    cv2.imwrite(str(root / "png_masks" / name), mask)


def test_truncated_image(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _png_pair(tmp_path, "a.png", rng.integers(0, 255, (64, 64), dtype=np.uint8),
              np.zeros((64, 64), np.uint8))
    path = tmp_path / "png_images" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(err.value).startswith(f"{path}: not a readable image")
    code, data = _inspect_json(capsys, tmp_path)
    assert code == 2
    assert _one_problem(data, "unreadable")["path"] == str(path)


def _siim(tmp_path, make_dicom, rows, pixels=True):
    root = tmp_path / "siim"
    root.mkdir()
    uid = "1.2.3.4.5"
    pix = np.arange(64, dtype=np.uint8).reshape(8, 8) if pixels else None
    make_dicom(root / f"{uid}.dcm", pix, SOPInstanceUID=uid)
    (root / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n" + "".join(f"{uid}, {r}\n" for r in rows)
    )
    return root


def test_dicom_without_pixel_data(tmp_path, capsys, make_dicom):
    root = _siim(tmp_path, make_dicom, ["-1"], pixels=False)
    code, data = _inspect_json(capsys, root)
    assert code == 2 and data["layout"] == "siim"
    problem = _one_problem(data, "unreadable")
    assert problem["path"] == str(root / "1.2.3.4.5.dcm")
    assert problem["problem"] == "DICOM file has no pixel data"


def test_rle_past_the_image(tmp_path, capsys, make_dicom):
    root = _siim(tmp_path, make_dicom, ["0 10", "60 10"])  # 8x8 image: second run ends at 80
    code, data = _inspect_json(capsys, root)
    assert code == 2
    problem = _one_problem(data, "unreadable-mask")
    assert problem["path"] == str(root / "train-rle.csv")
    assert "runs past the image" in problem["problem"]


def test_mask_of_another_size(tmp_path, capsys):
    _png_pair(tmp_path, "a.png", np.zeros((32, 32), np.uint8), np.zeros((32, 16), np.uint8))
    code, data = _inspect_json(capsys, tmp_path)
    assert code == 2
    problem = _one_problem(data, "size-mismatch")
    assert problem["path"] == str(tmp_path / "png_masks" / "a.png")
    assert problem["problem"].startswith("mask is 16x32 but its image is 32x32")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'empty'}: dataset folder is empty"


def test_csv_without_expected_columns(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label\na.png,1\n")
    assert main(["inspect", str(tmp_path / "list.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'list.csv'}: expected columns image,mask, found path,label"
    with pytest.raises(DataError, match="expected columns"):
        load_records(tmp_path / "list.csv")


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ptxseg", "inspect", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'absent'}: dataset not found"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
