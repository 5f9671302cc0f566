"""`ptxseg tune` as a user sees it (issue 26): stage lines and a progress bar while it works,
one line when the chosen rule lies on the grid's edge (and --grid wide), a thresholds.json
that no tune wrote replaced only with --overwrite (a tune's replaced, and said), and an
evaluation on the images the thresholds were tuned on called optimistic, in the warning,
metrics.json and the page."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ptxseg.cli import main
from ptxseg.data.sources import load_records
from ptxseg.data.split import write_split
from ptxseg.postprocess import PostParams
from ptxseg.tune import (
    THRESHOLDS,
    WIDE_THRESHOLDS,
    Grid,
    GridStats,
    Mode,
    Objective,
    _choose,
    areas_for,
    edge_note,
    search,
)
from tests.conftest import make_run, parse_html_report

SIZE = 64


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run(tmp_path, synth_data) -> Path:
    """A run folder with a random model and a split of the synthetic set (half val)."""
    run = tmp_path / "run"
    make_run(run)
    records, _ = load_records(synth_data)
    write_split(run / "split.csv", records,
                {r.id: "val" if i % 2 else "train" for i, r in enumerate(records)})
    (run / "data.json").write_text(json.dumps({"root": str(synth_data), "layout": "png"}))
    return run


def test_tune_says_what_it_does_and_shows_progress(run, capsys):
    code, _, err = _cli(capsys, "tune", run, "--device", "cpu")
    assert code == 0, err
    lines = err.splitlines()
    n_val = 8
    assert lines[0] == (
        f"tune: {run}: predicting its {n_val} validation images ({run / 'split.csv'}) with "
        f"torch {run / 'best.ckpt'} (unet/efficientnet-b0, {SIZE} px, cpu)"
    )
    [bar] = [line for line in lines if line.startswith("Predicting validation split")]
    assert f"{n_val}/{n_val}" in bar and "img/s" in bar  # the final state of the bar
    assert (
        f"tune: searching {len(THRESHOLDS)} thresholds x {len(areas_for(SIZE))} removal areas "
        f"(default grid, objective iou) on {n_val} images"
    ) in lines
    assert lines.index(bar) < lines.index(next(x for x in lines if "searching" in x))


# ------------------------------------------------------------------------------ grid edges


def _stats(lesion: float, background: float, thresholds=THRESHOLDS) -> GridStats:
    """One 32 px image: a lesion with probability ``lesion``, the rest ``background``."""
    gt = np.zeros((32, 32), np.uint8)
    gt[8:20, 8:20] = 1
    probs = np.where(gt > 0, lesion, background).astype(np.float32)
    stats = GridStats(thresholds=thresholds, areas=(0, 4, 8))
    stats.add(probs, gt, "a")
    return stats


def test_a_rule_on_the_edge_of_the_grid_is_said():
    """Background at 0.92, lesion at 0.99: only the highest threshold (0.95) separates them,
    and it scores above 0.9: the line names it and --grid wide; on the wide grid (up to
    0.999) 0.95 is no edge. A plateau (lesion 0.99, background 0.0: every threshold ties)
    says nothing, and neither does area 0 (nothing lies below it)."""
    result = search(_stats(0.99, 0.92), objective="iou")
    assert result.params.binary_threshold == 0.95 and result.params.removal_area == 0
    assert edge_note(result) == (
        "the chosen threshold 0.95 is the highest of the grid and scores above its neighbour "
        "0.9: the best may lie beyond it; run tune again with --grid wide (thresholds "
        "0.001-0.999, removal areas up to 16384 px of a 512 px input)"
    )
    wide = search(_stats(0.99, 0.92, WIDE_THRESHOLDS), objective="iou")
    assert wide.params.binary_threshold == 0.95 and edge_note(wide, Grid.WIDE) is None
    assert edge_note(search(_stats(0.99, 0.0), objective="iou")) is None  # a plateau
    # the lowest threshold: lesion at 0.015 (kept by 0.01, not by 0.02), background 0.005
    low = search(_stats(0.015, 0.005), objective="iou")
    assert low.params.binary_threshold == 0.01
    assert edge_note(low).startswith(
        "the chosen threshold 0.01 is the lowest of the grid and scores above its neighbour "
        "0.02: the best may lie beyond it")


def test_the_edge_note_of_an_area_and_of_the_triplet_rule():
    gt = np.zeros((32, 32), np.uint8)
    gt[4:20, 4:20] = 1
    probs = np.where(gt > 0, 0.9, 0.0).astype(np.float32)
    probs[25:28, 25:28] = 0.9  # a 9 px false positive: removed by areas >= 10 only
    stats = GridStats(thresholds=THRESHOLDS, areas=(0, 4, 10))
    stats.add(probs, gt, "a")
    result = search(stats, objective="iou")
    assert result.params.removal_area == 10
    assert edge_note(result).startswith(
        "the chosen removal area 10 px is the largest of the grid and scores above its "
        "neighbour 4: the best may lie beyond it")
    triplet = search(_stats(0.99, 0.92), mode="triplet", objective="iou")
    note = edge_note(triplet)
    assert note is not None and "threshold 0.95 is the highest of the grid" in note


def test_the_edge_note_is_a_warning_written_into_thresholds_json_unless_another_says_more():
    stats = _stats(0.99, 0.92)
    _, notes = _choose(stats, objective=Objective.IOU, mode=Mode.PIXEL, size=32, where="w",
                       what="the validation split")  # fmt: skip
    assert len(notes) == 1 and notes[0].startswith("the chosen threshold 0.95 is the highest")
    nothing = _stats(0.001, 0.0)  # the model finds nothing: that warning alone
    _, notes = _choose(nothing, objective=Objective.IOU, mode=Mode.PIXEL, size=32, where="w",
                       what="the validation split")  # fmt: skip
    assert len(notes) == 1 and "finds almost nothing" in notes[0]


# ----------------------------------------------------------------------- thresholds.json


def test_tune_replaces_only_a_thresholds_file_that_a_tune_wrote(run, capsys):
    path = run / "thresholds.json"
    path.write_text('{"binary_threshold": 0.3, "removal_area": 0}\n')  # hand-written
    code, _, err = _cli(capsys, "tune", run, "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {path}: exists and was not written by ptxseg tune (a hand-written rule?); "
        "refusing to replace it (--overwrite to replace it)"
    )
    assert path.read_text() == '{"binary_threshold": 0.3, "removal_area": 0}\n'
    assert "tune: " not in err  # refused before the model loaded
    code, _, err = _cli(capsys, "tune", run, "--device", "cpu", "--overwrite")
    assert code == 0, err
    first = json.loads(path.read_text())
    code, _, err = _cli(capsys, "tune", run, "--device", "cpu", "--objective", "kaggle")
    assert code == 0, err
    rule = PostParams(**{k: first[k] for k in ("binary_threshold", "removal_area", "size")})
    second = json.loads(path.read_text())
    now = PostParams(**{k: second[k] for k in ("binary_threshold", "removal_area", "size")})
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        f"note: {path}: replaced the previous tune's rule ({rule.describe()}) with "
        f"{now.describe()}"
    ]


# ------------------------------------------------------------------------------ optimism


def test_evaluating_the_images_tuned_on_is_called_optimistic(run, synth_data, tmp_path,
                                                             capsys):
    """tune, then evaluate --split val of the same run: the scores are of the images the
    post-processing was chosen on. thresholds.json records their ids; evaluate counts them
    (n_tuned_ids), warns, writes the reason into metrics.json and the page. The same images
    under other ids, or a hand-written rule: nothing said."""
    assert _cli(capsys, "tune", run, "--device", "cpu")[0] == 0
    val = sorted(json.loads((run / "thresholds.json").read_text())["tuned_ids"])
    with (run / "split.csv").open(newline="") as fh:
        assert val == sorted(r["id"] for r in csv.DictReader(fh) if r["split"] == "val")
    out = tmp_path / "val"
    code, _, err = _cli(capsys, "evaluate", run, "--data", synth_data, "--out", out,
                        "--split", "val")  # fmt: skip
    assert code == 0, err
    expected = (
        f"{len(val)} of the {len(val)} images have the ids of the images the thresholds were "
        f"tuned on ({run / 'thresholds.json'}): if they are the same images, these scores are "
        "optimistic (the post-processing was chosen on them); evaluate on images that neither "
        "training nor tuning saw"
    )
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {expected}"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_tuned_ids"] == len(val) and m["optimistic"] == [expected]
    assert f"Optimistic scores: {expected}." in parse_html_report(out / "report.html")["text"]

    other = tmp_path / "other"  # the same images under other ids: no claim
    for sub in ("png_images", "png_masks"):
        (other / sub).mkdir(parents=True)
        for p in (synth_data / sub).iterdir():
            shutil.copy(p, other / sub / f"other_{p.name}")
    code, _, err = _cli(capsys, "evaluate", run, "--data", other, "--out", tmp_path / "o")
    assert code == 0 and "warning:" not in err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n_tuned_ids"] == 0 and m["optimistic"] == []
    assert "Optimistic" not in parse_html_report(tmp_path / "o" / "report.html")["text"]
