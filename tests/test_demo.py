"""`ptxseg demo` end to end at a reduced size (the full size is measured in docs/benchmarks.md).

Every test runs in a scratch working directory that holds a ``demo/`` folder, as the project
root does after ``make demo``: the built-in ``demo`` config must never be taken for it."""

from __future__ import annotations

import csv
import io
import json
import re

import cv2
import pytest
from rich.console import Console

from ptxseg.cli import main
from ptxseg.demo import MARKER, DemoSize, _prepare_out, run_demo
from ptxseg.errors import RunDirError

TINY = [
    "model.encoder=efficientnet-b0",
    "data.size=64",
    "train.epochs=1",
    "train.batch_size=4",
    "data.workers=0",
    "train.accelerator=cpu",
]


@pytest.fixture(autouse=True)
def _cwd_holding_a_demo_folder(tmp_path_factory, monkeypatch):
    """Independent of where pytest runs, and in the state `make demo` leaves behind."""
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / "demo" / "run").mkdir(parents=True)
    (cwd / "demo" / MARKER).write_text("{}")
    monkeypatch.chdir(cwd)
    return cwd


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    buf = io.StringIO()
    metrics = run_demo(
        out,
        size=DemoSize(n_train=24, n_test=8, image_size=64),
        overrides=TINY,
        progress=False,
        console=Console(file=buf, width=400),
    )

    # the held-out evaluation, in the evaluate command's format
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    masks = sorted((out / "data/test/png_masks").glob("*.png"))
    positives = sum(int(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).any()) for p in masks)
    assert saved["n_images"] == len(masks) == 8 and saved["n_positive"] == positives
    assert saved["n_train_ids"] == 0  # the held-out images have their own ids
    pooled = saved["pooled"]
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == 8 * 64 * 64
    assert "<img" in (out / "report.html").read_text() and (out / "confusion_matrix.png").exists()

    # each stage's files
    for name in ("config.yaml", "split.csv", "best.ckpt", "metrics.csv", "thresholds.json"):
        assert (out / "run" / name).stat().st_size > 0, name
    with open(out / "predictions/results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    with open(out / "predictions/submission.csv") as fh:
        assert [r["ImageId"] for r in csv.DictReader(fh)] == [
            f"test_{i:04d}" for i in range(4)
        ]
    record = json.loads((out / MARKER).read_text())
    assert set(record["seconds"]) == {"synth", "train", "tune", "evaluate", "predict", "total"}
    assert record["pooled_dice"] == pooled["f1"] and record["n_train"] == 24

    # every step prints a one-line result under its title (none was empty)
    from ptxseg.postprocess import load_params
    from ptxseg.train import run_summary

    text = buf.getvalue()
    sections = re.split(r"^─*\s*(\d)/5 (.*?)\s*─*$", text, flags=re.M)
    results = {int(sections[i]): sections[i + 2].strip() for i in range(1, len(sections), 3)}
    titles = {int(sections[i]): sections[i + 1] for i in range(1, len(sections), 3)}
    assert sorted(results) == [1, 2, 3, 4, 5] and all(results.values())
    assert titles[2].endswith("64 px, 1 epoch")  # not "1 epochs"
    assert results[1].startswith(f"{out / 'data/train'}: 24 images, ")
    assert run_summary(out / "run") in results[2]
    params = load_params(out / "run/thresholds.json")
    assert f"chosen: {params.describe()} (" in results[3]
    assert results[3].endswith(str(out / "run/thresholds.json"))
    assert (
        f"8 held-out images: pooled Dice {pooled['f1']:.4f}, IoU {pooled['iou']:.4f}; "
        f"per-image (SIIM-ACR) Dice {saved['per_image']['kaggle_dice']:.4f}"
    ) in results[4]
    n_pos = sum(r["has_pneumothorax"] in ("1", "True", "true") for r in _rows(out))
    assert f"4 images predicted, {n_pos} with pneumothorax" in results[5]


def _rows(out):
    with open(out / "predictions/results.csv") as fh:
        return list(csv.DictReader(fh))


def test_demo_replaces_only_a_previous_demo(tmp_path):
    prev = tmp_path / "prev"
    (prev / "run").mkdir(parents=True)
    (prev / MARKER).write_text("{}")
    (prev / "notes.txt").write_text("mine")  # not the demo's: kept
    _prepare_out(prev)
    assert sorted(p.name for p in prev.iterdir()) == ["notes.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(RunDirError, match="not a previous demo output"):
        _prepare_out(other)
    assert (other / "data.csv").read_text() == "x"


def test_cli_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--n-train", "8"]) == 2
    err = capsys.readouterr().err
    assert "not a previous demo output" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
