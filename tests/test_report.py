"""The report: valid self-contained HTML, every name from the data escaped, figures that
decode, null metrics shown with their reason."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest

from ptxseg.cli import main
from ptxseg.cli.app import metrics_table
from ptxseg.metrics import image_stats, summarize
from ptxseg.postprocess import PostParams
from ptxseg.report import (
    GT_RGB,
    PRED_RGB,
    Overlay,
    draw_contours,
    grid_figure,
    make_panel,
    metric_rows,
    training_curves,
    write_confusion_matrix,
    write_overlay,
    write_report,
)
from ptxseg.run import Run
from tests.conftest import make_run, parse_html_report

EVIL = "<img src=x onerror=alert(1)>&\"q'"


def _all_positive_metrics() -> dict:
    g = np.zeros((8, 8), np.uint8)
    g[:4, :4] = 1
    m = summarize([image_stats("a", g, g, 0.9), image_stats("b", np.zeros_like(g), g, 0.1)])
    m["thresholds"] = PostParams(binary_threshold=0.3, removal_area=0, size=64).to_dict()
    m.update(compared_at="native", size=64, tta="none", split="all", data="/d", layout="ptx498")
    return m


def test_report_escapes_names_from_data(tmp_path):
    """Evaluate a dataset whose folder and file names carry markup: it shows up as text."""
    from ptxseg.data.synthetic import generate

    run = tmp_path / "run"
    make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=64))
    data = tmp_path / "<b onclick=x>data"
    generate(data, n=4, size=64, seed=1)
    first = sorted((data / "png_images").iterdir())[0].name
    for sub in ("png_images", "png_masks"):
        (data / sub / first).rename(data / sub / f"{EVIL}.png")
    out = tmp_path / "out"
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out)]) == 0
    text = (out / "report.html").read_text()
    assert "<img src=x" not in text and "<b onclick" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;q&#x27;" in text
    page = parse_html_report(out / "report.html")  # every <img> is an embedded PNG
    assert "b" not in page["tags"]
    assert EVIL in page["text"]  # shown as text in the random cases' table
    assert str(data) in page["text"]
    with (out / "per_image.csv").open(newline="") as fh:  # the csv round-trips the id
        assert EVIL in [r["id"] for r in csv.DictReader(fh)]
    assert json.loads((out / "metrics.json").read_text())["data"] == str(data)


def test_report_with_null_metrics_and_no_curves(tmp_path):
    metrics = _all_positive_metrics()
    run = Run(tmp_path / "run")
    run.path.mkdir()
    write_confusion_matrix(tmp_path / "cm.png", metrics["pooled"])
    write_report(
        tmp_path / "report.html",
        metrics,
        run=run,
        thresholds_path=None,
        confusion_png=tmp_path / "cm.png",
        curves_png=None,
        overlays={},
    )
    page = parse_html_report(tmp_path / "report.html")
    assert len(page["imgs"]) == 1
    assert "no negative image" in page["text"] and "n/a" in page["text"]
    assert "No training curves" in page["text"] and "No cases to show" in page["text"]
    assert page["tags"]["table"] == 2  # metrics, post-processing


def test_metric_rows_and_rich_table():
    from rich.console import Console

    metrics = _all_positive_metrics()
    rows = {(s, k): (v, r) for s, k, v, r in metric_rows(metrics)}
    assert rows[("detection", "specificity")] == ("n/a", "no negative image")
    assert rows[("pooled", "tp")][0] == "16"
    assert rows[("pooled", "recall")][0] == "0.5000"
    console = Console(record=True, width=140)
    console.print(metrics_table(metrics))
    out = console.export_text()
    assert "2 images (2 with pneumothorax)" in out and "no negative image" in out
    assert "0.5000" in out


def test_confusion_matrix_png(tmp_path):
    pooled = {"tn": 2**33, "fp": 12345, "fn": 678, "tp": 9000}
    path = write_confusion_matrix(tmp_path / "cm.png", pooled)
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 800


def test_draw_contours_colours_and_downscale():
    image = np.full((1024, 768), 100, np.uint8)
    gt = np.zeros((1024, 768), np.uint8)
    gt[100:400, 100:300] = 1
    pred = np.zeros_like(gt)
    pred[600:900, 400:700] = 1
    rgb = draw_contours(image, gt, pred)
    assert rgb.shape == (384, 288, 3)
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert GT_RGB in colours and PRED_RGB in colours
    # the ground-truth contour is in the top-left quarter, the prediction's in the bottom-right
    green = np.all(rgb == GT_RGB, axis=2)
    red = np.all(rgb == PRED_RGB, axis=2)
    assert green[:192, :144].sum() == green.sum() and red[192:, 144:].sum() == red.sum()
    # masks at model resolution over a larger radiograph: the image is resized to them
    small = draw_contours(image, gt[::16, ::16], pred[::16, ::16])
    assert small.shape == (64, 48, 3)


def test_overlay_grid_png(tmp_path):
    g = np.zeros((64, 64), np.uint8)
    g[10:30, 10:30] = 1
    stats = image_stats("$x^2$ {weird}", g, g, 0.9)  # mathtext-looking names are plain text
    panels = [make_panel(np.full((64, 64), 80, np.uint8), g, g, stats) for _ in range(5)]
    path = write_overlay(tmp_path / "o" / "best.png", panels, "best")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] > img.shape[1] / 3  # 2 rows of 4
    ov = Overlay(path, [stats])
    assert ov.cases[0].dice == 1.0


def test_grid_figure_only_for_pixel_grids():
    rows = [[t, a, t * (a + 1)] for t in (0.1, 0.5) for a in (0, 256)]
    obj = {"grid": {"columns": ["binary_threshold", "removal_area", "score"], "rows": rows}}
    assert grid_figure(obj) is not None
    triplet = {"grid": {"columns": ["top_threshold", "min_area", "bottom_threshold", "score"]}}
    assert grid_figure(triplet) is None and grid_figure({}) is None


def test_training_curves_from_metrics_csv(tmp_path):
    from ptxseg.plots import METRICS_COLUMNS

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    assert training_curves(Run(run), out) is None
    lines = [",".join(METRICS_COLUMNS)] + [
        ",".join(str(v) for v in (e, 1 / (e + 1), 1.2 / (e + 1), 0.1 * e, 0.15 * e, 1e-4, 3.0))
        for e in range(4)
    ]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    png = training_curves(Run(run), out)
    assert png == out / "training_curves.png" and cv2.imread(str(png)) is not None
    # an unusable metrics.csv falls back to the run's own curves.png
    (run / "metrics.csv").write_text("epoch\nx\n")
    shutil.copy(png, run / "curves.png")
    assert training_curves(Run(run), out) == run / "curves.png"


def test_parse_html_report_rejects_broken_pages(tmp_path):
    bad = tmp_path / "report.html"
    bad.write_text("<html><body><div><p>x</div></body></html>")
    with pytest.raises(AssertionError):
        parse_html_report(bad)
    bad.write_text('<html><body><img src="http://example.com/x.png"></body></html>')
    with pytest.raises(AssertionError, match="embedded PNG"):
        parse_html_report(bad)
