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
    assert main(["synth", str(tmp_path / "s"), "--n", "2"]) == 2  # not empty: refused
    assert "not empty" in capsys.readouterr().err
