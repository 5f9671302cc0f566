"""Several run-length CSVs in one siim folder: ``--rle FILE`` (and ``data.rle``) picks one on
every command that reads a dataset, and a run records its choice in data.json so tune and
evaluate find it again."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np

from ptxseg.cli import main
from ptxseg.data.rle import encode
from ptxseg.run import Run
from tests.test_data_sources import _small_siim
from tests.test_train_cli import CPU_SETS


def _siim_two_csvs(root, make_dicom):
    uids, masks = _small_siim(root, make_dicom, n=12)
    (root / "rle").mkdir()
    (root / "rle" / "good.csv").write_text("ImageId,EncodedPixels\n" + "".join(
        f"{u},{encode(m)}\n" for u, m in zip(uids, masks, strict=True)))
    (root / "rle" / "decoy.csv").write_text("ImageId,EncodedPixels\n" + "".join(
        f"{u},-1\n" for u in uids))
    return dict(zip(uids, masks, strict=True))


def test_rle_option_on_inspect_train_tune_evaluate_prepare(tmp_path, make_dicom, capsys,
                                                           monkeypatch):
    root = tmp_path / "ds"
    masks = _siim_two_csvs(root, make_dicom)
    good = root / "rle" / "good.csv"

    assert main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "several run-length CSVs found" in err
    assert "--rle FILE" in err and "\n" not in err
    assert main(["inspect", str(root), "--rle", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "siim" and report["positive"] == sum(
        int(m.any()) for m in masks.values())

    run = tmp_path / "run"
    monkeypatch.chdir(root)  # --rle is a path like any other: relative to the current folder
    argv = ["train", "--config", "paper", "--data", str(root), "--out", str(run), *CPU_SETS,
            "--set", "data.val_fraction=0.34", "--rle", "rle/good.csv"]
    assert main(argv) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    info = json.loads((run / "data.json").read_text())
    assert info == {"root": str(root.resolve()), "layout": "siim", "rle": str(good.resolve())}
    assert Run(run).config().data.rle == str(good)

    assert main(["tune", str(run)]) == 0  # the recorded CSV, not "several CSVs found"
    with (run / "split.csv").open() as fh:
        val = [row["id"] for row in csv.DictReader(fh) if row["split"] == "val"]
    obj = json.loads((run / "thresholds.json").read_text())
    assert obj["n_images"] == len(val)
    assert obj["n_positive"] == sum(int(masks[i].any()) for i in val) > 0

    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--data", str(root), "--split", "val",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == len(val) and m["n_positive"] == obj["n_positive"]
    true_px = sum(int(masks[i].sum()) for i in val)
    assert m["pooled"]["tp"] + m["pooled"]["fn"] == true_px
    # --rle wins over the recorded one: the decoy CSV says no image has a lesion
    out2 = tmp_path / "eval-decoy"
    assert main(["evaluate", str(run), "--data", str(root), "--split", "val", "--out", str(out2),
                 "--rle", str(root / "rle" / "decoy.csv")]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["n_positive"] == 0

    copy = tmp_path / "copy"
    assert main(["prepare", str(root), str(copy), "--size", "64", "--rle", str(good)]) == 0
    with (copy / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == sorted(masks)
    for r in rows:
        written = cv2.imread(str(copy / r["mask"]), cv2.IMREAD_GRAYSCALE) > 0
        np.testing.assert_array_equal(written, masks[r["id"]] > 0)
