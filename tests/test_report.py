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
from ptxseg.figures import (
    Overlay,
    grid_figure,
    make_panel,
    training_curves,
    write_confusion_matrix,
    write_overlay,
)
from ptxseg.metrics import image_stats, summarize
from ptxseg.overlays import PRED_RGB, draw_overlay
from ptxseg.overlays import TRUTH_RGB as GT_RGB
from ptxseg.postprocess import PostParams
from ptxseg.report import metric_rows, write_report
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
    assert page["tags"]["table"] == 3  # metrics, image-level confusion matrix, post-processing
    # the image-level confusion matrix: 2 positives, 1 found (50%), no negative image
    assert "0 (0%)" not in page["text"] and "1 (50%)" in page["text"]


def test_metric_rows_and_rich_table():
    from rich.console import Console

    metrics = _all_positive_metrics()
    rows = {(s, k): (v, r) for s, k, v, r in metric_rows(metrics)}
    assert rows[("detection", "specificity")] == ("n/a", "no negative image")
    assert rows[("pooled", "tp")][0] == "16"
    assert rows[("pooled", "recall")][0] == "0.500"
    console = Console(record=True, width=140)
    console.print(metrics_table(metrics))
    out = console.export_text()
    assert "2 images (2 with pneumothorax)" in out and "no negative image" in out
    assert "0.500" in out and "0.5000" not in out and "CI" not in out  # no intervals: no column


def test_confusion_matrix_png(tmp_path):
    pooled = {"tn": 2**33, "fp": 12345, "fn": 678, "tp": 9000}
    path = write_confusion_matrix(tmp_path / "cm.png", pooled)
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 700
    from ptxseg.figures import confusion_figure

    fig = confusion_figure(pooled)
    assert len(fig.axes) == 4  # two matrices, each with its colour bar
    counts_bar = fig.axes[2]
    assert counts_bar.get_yscale() == "log"
    assert counts_bar.get_ylim()[1] >= 2**33  # the scale reaches the largest count
    import matplotlib.pyplot as plt

    plt.close(fig)


def draw_contours(image, gt, pred):
    """An evaluation panel's drawing without its caption (as figures.make_panel calls it)."""
    from ptxseg.figures import PANEL_SIZE

    return draw_overlay(image, pred, gt, style="fill", max_side=PANEL_SIZE, min_side=PANEL_SIZE)


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
    truth = np.all(rgb == GT_RGB, axis=2)
    predicted = np.all(rgb == PRED_RGB, axis=2)
    assert truth[:192, :144].sum() == truth.sum()
    assert predicted[192:, 144:].sum() == predicted.sum()
    # colour-blind safe: not the old red on green
    assert (GT_RGB, PRED_RGB) != ((0, 200, 0), (255, 40, 40))
    # masks at model resolution over a larger radiograph: the image is resized to them
    # (and small masks are enlarged to the panel size, so that lines stay legible)
    small = draw_contours(image, gt[::16, ::16], pred[::16, ::16])
    assert small.shape == (384, 288, 3)
    assert np.all(small == GT_RGB, axis=2)[:192, :144].any()


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


def test_panel_of_a_whole_image_prediction_is_visible():
    """The case that read "Dice 0.000" with no red: a prediction covering the whole image is
    tinted all over and framed inside the picture."""
    image = np.full((256, 256), 100, np.uint8)
    full = np.ones((256, 256), np.uint8)
    rgb = draw_contours(image, np.zeros_like(full), full)
    assert np.any(rgb != 100, axis=2).all()
    assert np.all(rgb[5:-5, 5:-5, 0].astype(int) > rgb[5:-5, 5:-5, 2].astype(int) + 20)
    stats = image_stats("full", full, np.zeros_like(full), 0.97)
    panel = make_panel(image, np.zeros_like(full), full, stats)
    assert panel.rgb.shape[0] > 256  # the caption bar
    assert panel.title == "full\nDice 0.000, truth 0 px"


def _figure_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return renderer


def test_overlay_grid_titles_clear_the_row_above():
    import matplotlib.pyplot as plt

    from ptxseg.figures import Panel, overlay_figure

    g = np.zeros((64, 64), np.uint8)
    g[10:30, 10:30] = 1
    stats = image_stats("a-rather-long-case-identifier-0001", g, g, 0.9)
    captioned = [make_panel(np.full((64, 64), 80, np.uint8), g, g, stats) for _ in range(8)]
    # square tiles with two-line titles: the layout that overlapped before
    tile = np.full((384, 384, 3), 80, np.uint8)
    square = [Panel(tile, "13_test_0_\nDice 0.000") for _ in range(8)]
    for panels in (captioned, square):
        fig = overlay_figure(panels, "best")
        renderer = _figure_boxes(fig)
        axes = fig.axes
        for above, below in zip(axes[:4], axes[4:], strict=True):
            image_box = above.images[0].get_window_extent(renderer)
            title_box = below.title.get_window_extent(renderer)
            assert title_box.y1 < image_box.y0, "a title overlaps the picture above it"
        plt.close(fig)


def test_training_curve_annotations_inside_the_plot():
    """The best-epoch note stays inside its axes, also when the best epoch is the last."""
    import matplotlib.pyplot as plt

    from ptxseg.plots import curves_figure

    rows = [
        dict(epoch=e, train_loss=1 / (e + 1), val_loss=1.2 / (e + 1), val_iou=0.1 * e,
             val_dice=0.15 * e, lr=1e-4, time_s=3.0)
        for e in range(5)
    ]
    fig = curves_figure(rows)
    renderer = _figure_boxes(fig)
    ax_iou = fig.axes[1]
    box = ax_iou.get_window_extent(renderer)
    legend = ax_iou.get_legend()
    for artist in [*ax_iou.texts, legend]:
        ext = artist.get_window_extent(renderer)
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1
    assert "best IoU 0.400 (epoch 4)" in [t.get_text() for t in legend.get_texts()]
    plt.close(fig)


def test_grid_heatmap_marks_the_chosen_cell():
    from matplotlib.patches import Rectangle

    rows = [[t, a, t * (a + 1)] for t in (0.1, 0.3, 0.5) for a in (0, 64, 256)]
    obj = {
        "binary_threshold": 0.3, "removal_area": 256, "objective": "iou", "score": 77.1,
        "grid": {"columns": ["binary_threshold", "removal_area", "score"], "rows": rows},
    }
    fig = grid_figure(obj)
    ax = fig.axes[0]
    marks = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert marks and {(p.get_x(), p.get_y()) for p in marks} == {(2 - 0.5, 1 - 0.5)}
    assert "chosen (outlined): threshold 0.3, area 256, iou 77.100" in ax.get_title()
    # a rule that is not on the grid: nothing marked
    obj["binary_threshold"] = 0.42
    fig2 = grid_figure(obj)
    assert not fig2.axes[0].patches and "chosen" not in fig2.axes[0].get_title()
    import matplotlib.pyplot as plt

    plt.close("all")


def _report_metrics():
    from ptxseg.metrics import bootstrap_cis

    g = np.zeros((8, 8), np.uint8)
    g[:4, :4] = 1
    p = np.zeros_like(g)
    p[:4, :2] = 1
    z = np.zeros_like(g)
    stats = [image_stats("a", p, g, 0.9), image_stats("b", z, g, 0.2),
             image_stats("c", z, z, 0.1), image_stats("d", p, z, 0.7),
             image_stats("e", g, g, 0.95)]
    m = summarize(stats)
    m["confidence_intervals"] = bootstrap_cis(stats, n_resamples=200, seed=3)
    m["thresholds"] = PostParams(binary_threshold=0.45, removal_area=0, size=64).to_dict()
    m.update(compared_at="native", size=64, tta="none", split="val", data="/d", layout="png")
    return m, stats


def test_report_shows_intervals_image_matrix_and_sentence(tmp_path):
    m, _ = _report_metrics()
    run = tmp_path / "run"
    run.mkdir()
    thr = run / "thresholds.json"
    thr.write_text(json.dumps({"binary_threshold": 0.45, "removal_area": 0, "objective": "iou",
                               "score": 0.123456, "n_images": 4}))
    write_confusion_matrix(tmp_path / "cm.png", m["pooled"])
    write_report(tmp_path / "report.html", m, run=Run(run), thresholds_path=thr,
                 confusion_png=tmp_path / "cm.png", curves_png=None, overlays={})
    page = parse_html_report(tmp_path / "report.html")
    text = page["text"]
    lo, hi = m["confidence_intervals"]["intervals"]["pooled.iou"]
    assert f"{lo:.3f} - {hi:.3f}" in text
    assert "95% CI (bootstrap over images, 200 resamples)" in text
    assert f"{m['pooled']['iou']:.3f}" in text and f"{m['pooled']['iou']:.4f}" not in text
    assert "note" not in text.split("Confusion matrix")[0].split("95% CI")[1][:40]  # no reasons
    # image-level matrix: 3 positive images, 2 found (67%); 2 negatives, 1 false positive
    assert "2 (67%)" in text and "1 (33%)" in text and "1 (50%)" in text
    assert f"From {thr}: chosen to maximise iou = 0.123 on 4 validation images." in text
    assert "binary_threshold0.45" in text.replace("\n", "")  # the rule as written, not 0.450


def test_empty_columns_are_hidden():
    from ptxseg.report import _table

    html_text = _table(["a", "b", "c"], [["1", "", "x"], ["2", "", ""]])
    assert "<th>b</th>" not in html_text and "<th>c</th>" in html_text
    assert _table(["a", "b"], []).count("<th>") == 2


def test_ratio_text_precision():
    from ptxseg.report import ratio_text

    assert ratio_text(0.41234) == "0.412"
    assert ratio_text(0.99873) == "0.999"
    assert ratio_text(0.99993) == "0.9999"  # not 1.000
    assert ratio_text(0.00004) == "0.00004"
    assert ratio_text(1.0) == "1.000" and ratio_text(0.0) == "0.000"
