"""report.html rendered by a real browser: headless Chromium (Debian's ``chromium`` package)
parses it with every heading in place and paints a page that is not blank.

Skipped where no Chromium is installed, except in CI (``PTXSEG_REQUIRE_CHROMIUM=1``, set by
``.ci/run``, which installs it), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from ptxseg.figures import Overlay, make_panel, write_confusion_matrix, write_overlay
from ptxseg.metrics import bootstrap_cis, image_stats, summarize
from ptxseg.plots import METRICS_COLUMNS
from ptxseg.postprocess import PostParams
from ptxseg.report import write_report

HEADINGS = ["Metrics", "Confusion matrix", "Training curves", "Post-processing", "Cases"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    msg = "headless Chromium not found (Debian: apt-get install -y chromium)"
    if os.environ.get("PTXSEG_REQUIRE_CHROMIUM") == "1":
        pytest.fail(msg + " (PTXSEG_REQUIRE_CHROMIUM=1)")
    pytest.skip(msg)


def _browser(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def _report(tmp_path):
    """A report with every section: metrics with intervals, matrices, curves, grid, cases."""
    rng = np.random.default_rng(0)
    stats, panels = [], []
    for i in range(6):
        gt = np.zeros((96, 96), np.uint8)
        pred = np.zeros_like(gt)
        if i % 2:
            gt[20:50, 10:40] = 1
        if i % 3:
            pred[25:55, 12:45] = 1
        image = (rng.random((96, 96)) * 120 + 60).astype(np.uint8)
        s = image_stats(f"case{i}", pred, gt, 0.9 if pred.any() else 0.2)
        stats.append(s)
        panels.append(make_panel(image, gt, pred, s))
    metrics = summarize(stats)
    metrics["confidence_intervals"] = bootstrap_cis(stats, n_resamples=200)
    metrics["thresholds"] = PostParams(binary_threshold=0.5, removal_area=64, size=64).to_dict()
    metrics.update(compared_at="native", size=64, tta="none", split="val", data="/d",
                   layout="png")
    run = tmp_path / "run"
    run.mkdir()
    lines = [",".join(METRICS_COLUMNS)] + [
        ",".join(str(v) for v in (e, 1 / (e + 1), 1.2 / (e + 1), 0.1 * e, 0.15 * e, 1e-4, 3.0))
        for e in range(4)
    ]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    grid = [[t, a, round(t * (a + 1) / 100, 4)] for t in (0.3, 0.5, 0.7) for a in (0, 64, 256)]
    thr = run / "thresholds.json"
    thr.write_text(json.dumps({
        "binary_threshold": 0.5, "removal_area": 64, "objective": "iou", "score": 0.325,
        "n_images": 6,
        "grid": {"columns": ["binary_threshold", "removal_area", "score"], "rows": grid},
    }))
    out = tmp_path / "out"
    out.mkdir()
    from ptxseg.figures import training_curves

    write_confusion_matrix(out / "cm.png", metrics["pooled"])
    overlay = Overlay(write_overlay(out / "best.png", panels, "best"), stats)
    from ptxseg.run import Run

    return write_report(out / "report.html", metrics, run=Run(run), thresholds_path=thr,
                        confusion_png=out / "cm.png", curves_png=training_curves(Run(run), out),
                        overlays={"best": overlay})


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    page = _report(tmp_path)
    url = page.resolve().as_uri()
    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<h1>ptxseg evaluation of <code>" in text
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text, heading
    assert text.count("<img ") == 4  # pixel matrix, curves, grid heatmap, one overlay grid
    assert "95% CI (bootstrap over images, 200 resamples)" in text

    shot = tmp_path / "shot.png"
    res = _browser(chromium, tmp_path / "profile", "--window-size=1280,3000",
                   f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (3000, 1280)
    assert img.std() > 20  # not one flat colour
    not_white = np.any(img < 240, axis=2)
    assert not_white.mean() > 0.05  # text, tables and figures painted
    assert not_white[:, 640:].any() and not_white[1500:].any()  # right half, lower half
