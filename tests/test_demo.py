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
from ptxseg.demo import MARKER, DemoSize, demo_folder, run_demo
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
    console = Console(file=buf, width=400)
    metrics = run_demo(
        out,
        size=DemoSize(n_train=24, n_test=8, image_size=64),
        overrides=TINY,
        progress=False,
        console=console,
        on_evaluated=lambda m: console.print(f"EVALUATED {m['n_images']}"),
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
    # the evaluation is handed over at the end of its step, before the predict step
    assert results[4].splitlines()[-1] == "EVALUATED 8" and "EVALUATED" not in results[5]


def _rows(out):
    with open(out / "predictions/results.csv") as fh:
        return list(csv.DictReader(fh))


def test_demo_replaces_only_a_previous_demo(tmp_path):
    prev = tmp_path / "prev"
    (prev / "run").mkdir(parents=True)
    (prev / "run" / "best.ckpt").write_text("old")
    (prev / MARKER).write_text("{}")  # a demo of an older version: demo.json, no record
    (prev / "notes.txt").write_text("mine")  # not the demo's: kept
    folder = demo_folder(prev)
    with folder.hold():
        folder.start([])
    assert sorted(p.name for p in prev.iterdir()) == [".ptxseg-demo.json", "notes.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(RunDirError, match="not a previous demo output"):
        demo_folder(other)
    assert (other / "data.csv").read_text() == "x"


def test_a_second_demo_replaces_the_first_ones_files_and_keeps_others(tmp_path, monkeypatch):
    """The demo's folder under the one rule, its steps replaced by file writes: each demo's
    record lists what it wrote; the next removes those (not a file put beside them), and a
    file of someone else inside the demo's run/ stops the run that would write there."""
    import ptxseg.demo as demo_mod

    def steps(n_images: int):
        def fake(out, *args):
            for i in range(n_images):
                (out / "data" / "train").mkdir(parents=True, exist_ok=True)
                (out / "data" / "train" / f"{i}.png").write_text("x")
            run = out / "run"
            if run.exists() and any(run.iterdir()):
                raise RunDirError(f"{run}: already exists and is not empty")
            run.mkdir(exist_ok=True)
            (run / "best.ckpt").write_text("w")
            (out / MARKER).write_text("{}")
            return {"n_images": n_images}
        return fake

    out = tmp_path / "demo"
    buf = io.StringIO()
    console = Console(file=buf, width=400)
    monkeypatch.setattr(demo_mod, "_run_steps", steps(3))
    run_demo(out, size=DemoSize(8, 2, 64), overrides=TINY, console=console)
    record = json.loads((out / ".ptxseg-demo.json").read_text())
    assert record["status"] == "done" and record["files"] == [
        "data/train/0.png", "data/train/1.png", "data/train/2.png", MARKER, "run/best.ckpt"]
    (out / "notes.txt").write_text("mine")
    (out / "run" / "mine.txt").write_text("mine too")
    monkeypatch.setattr(demo_mod, "_run_steps", steps(2))
    with pytest.raises(RunDirError, match="already exists and is not empty"):
        run_demo(out, size=DemoSize(8, 2, 64), overrides=TINY, console=console)
    assert (out / "run" / "mine.txt").read_text() == "mine too"
    assert json.loads((out / ".ptxseg-demo.json").read_text())["status"] == "running"
    (out / "run" / "mine.txt").unlink()
    run_demo(out, size=DemoSize(8, 2, 64), overrides=TINY, console=console)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == [".ptxseg-demo.json", "data/train/0.png", "data/train/1.png", MARKER,
                       "notes.txt", "run/best.ckpt"]  # fmt: skip
    # the previous demo is the one that stopped at run/: it had written two images
    assert buf.getvalue().splitlines()[-1] == (
        f"{out}: the previous demo's outputs were replaced: 2 files written again (2 in data/)"
    )


def test_cli_prints_the_metrics_table_before_the_predict_step(tmp_path, monkeypatch, capsys):
    import ptxseg.demo as demo_mod

    metrics = json.loads(json.dumps(_METRICS))

    def fake(out, *, console, on_evaluated, **kwargs):
        console.rule("4/5 evaluate")
        on_evaluated(metrics)
        console.rule("5/5 predict a few test images")
        console.print("4 images predicted")
        return metrics

    monkeypatch.setattr(demo_mod, "run_demo", fake)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    table = text.index("8 images (4 with pneumothorax),")  # the table's title
    assert table < text.index("kaggle_dice") < text.index("5/5 predict") < text.index(
        "held-out pooled Dice")


_METRICS = {
    "n_images": 8, "n_positive": 4, "compared_at": "native",
    "pooled": {"accuracy": 0.9, "recall": 0.5, "precision": 0.5, "f1": 0.5, "iou": 0.33,
               "tn": 10, "fp": 1, "fn": 1, "tp": 1},
    "per_image": {"kaggle_dice": 0.6}, "detection": {"sensitivity": 1.0},
}


def test_cli_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--n-train", "8"]) == 2
    err = capsys.readouterr().err
    assert "not a previous demo output" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
