"""Figures and the self-contained HTML report of an evaluation.

Everything a dataset names (ids, file names, paths) is HTML-escaped before it reaches the page,
and figure titles are drawn with math parsing off, so a file called ``<script>x</script>.png``
or ``$x$.png`` is shown as text. Images are embedded as base64 PNG data URIs: the report is one
file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ptxseg.fileio import save_figure, write_text
from ptxseg.metrics import ImageStats

if TYPE_CHECKING:
    from ptxseg.run import Run

TRAINING_CURVES_PNG = "training_curves.png"  # the run's curves, re-plotted into the report's out

PANEL_SIZE = 384  # longest side of an overlay panel, pixels
GT_RGB = (0, 200, 0)
PRED_RGB = (255, 40, 40)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# overlays


@dataclass
class Panel:
    """One overlay tile: the radiograph with both contours (RGB) and its caption."""

    rgb: np.ndarray
    title: str


@dataclass
class Overlay:
    """An overlay grid on disk and the statistics of the cases it shows."""

    png: Path
    cases: list[ImageStats]


def shrink_to(max_side: int, image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """``image`` (area interpolation) and same-size ``masks`` (nearest) shrunk so that the
    longest side is at most ``max_side``; returned unchanged when they already fit."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return (image, *masks)
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (
        cv2.resize(image, dsize, interpolation=cv2.INTER_AREA),
        *(cv2.resize(m, dsize, interpolation=cv2.INTER_NEAREST) for m in masks),
    )


def draw_contours(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Radiograph (gray uint8) with ground-truth (green) and prediction (red) contours, RGB.

    Shape:
        - image, gt, pred: ``(H, W)``; output ``(h, w, 3)`` with the longest side <= PANEL_SIZE
    """
    h, w = gt.shape
    if image.shape != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    image, gt, pred = shrink_to(PANEL_SIZE, image, gt, pred)
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    for mask, color in ((gt, GT_RGB), (pred, PRED_RGB)):
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(rgb, contours, -1, color, 2)
    return rgb


def make_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, stats: ImageStats) -> Panel:
    """The overlay tile of one case (``image`` gray uint8, any size; masks at the comparison
    resolution)."""
    rgb = draw_contours(image, gt, pred)
    name = stats.id if len(stats.id) <= 32 else stats.id[:29] + "..."
    return Panel(rgb, f"{name}\nDice {stats.dice:.3f}  (true {stats.true_area:,} px)")


def write_overlay(path: Path, panels: list[Panel], name: str) -> Path:
    """A grid of panels (4 per row) as a PNG."""
    plt = _plt()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        ax.imshow(panel.rgb)
        ax.set_title(panel.title, fontsize=8, parse_math=False)
    fig.suptitle(f"{name} cases: green = ground truth, red = prediction", fontsize=10)
    fig.tight_layout()
    save_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# confusion matrix, curves, grid


def write_confusion_matrix(path: Path, pooled: dict[str, Any]) -> Path:
    """The pooled pixel confusion matrix: counts, and normalised by the true class (rows)."""
    plt = _plt()
    cm = np.array([[pooled["tn"], pooled["fp"]], [pooled["fn"], pooled["tp"]]], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    labels = ["background", "pneumothorax"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, data, title, fmt in (
        (axes[0], cm, "pixels (counts)", lambda v: f"{int(v):,}"),
        (axes[1], norm, "normalised by true class", lambda v: f"{v:.4f}"),
    ):
        shown = np.log10(data + 1) if data is cm else data
        ax.imshow(shown, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(data):
            dark = shown[i, j] > 0.6 * shown.max() if shown.max() > 0 else False
            ax.text(j, i, fmt(v), ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks([0, 1], labels)
        ax.set_yticks([0, 1], labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle("Confusion matrix, all pixels of all images pooled")
    fig.tight_layout()
    save_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


def training_curves(run: Run, out: Path) -> Path | None:
    """The run's loss/IoU curves: re-plotted from its epoch metrics into
    ``out/training_curves.png`` (``ptxseg.plots``), else the run's own curves figure, else
    None."""
    from ptxseg.errors import PtxsegError
    from ptxseg.plots import plot_curves

    if run.metrics_path.exists():
        try:
            plot_curves(run.metrics_path, out / TRAINING_CURVES_PNG)
            return out / TRAINING_CURVES_PNG
        except (PtxsegError, OSError, ValueError):
            pass
    return run.curves_path if run.curves_path.exists() else None


def grid_figure(thresholds_obj: dict[str, Any]):
    """Heatmap of a pixel-mode grid search (score by threshold x removal area), or None."""
    grid = thresholds_obj.get("grid") if isinstance(thresholds_obj, dict) else None
    if not isinstance(grid, dict) or grid.get("columns") != [
        "binary_threshold",
        "removal_area",
        "score",
    ]:
        return None
    rows = grid.get("rows") or []
    ts = sorted({r[0] for r in rows})
    areas = sorted({r[1] for r in rows})
    table = np.full((len(ts), len(areas)), np.nan)
    for t, a, s in rows:
        table[ts.index(t), areas.index(a)] = s
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 6))
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(areas)), [str(a) for a in areas])
    ax.set_yticks(range(len(ts)), [f"{t:g}" for t in ts])
    ax.set_xlabel("removal area (px at model resolution)")
    ax.set_ylabel("binary threshold")
    ax.set_title(f"grid search: {thresholds_obj.get('objective', '')}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


METRIC_ROWS = (
    ("pooled", ("accuracy", "recall", "precision", "f1", "iou", "tn", "fp", "fn", "tp")),
    ("per_image", ("kaggle_dice", "dice_positive_mean", "iou_positive_mean")),
    ("detection", ("sensitivity", "specificity", "auc", "tp", "fp", "fn", "tn")),
)


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(section, metric, formatted value, reason-if-undefined) rows, in the report's order."""
    reasons = metrics.get("reasons", {})
    out = []
    for section, keys in METRIC_ROWS:
        for key in keys:
            if key in metrics.get(section, {}):
                value = metrics[section][key]
                out.append((section, key, _fmt(value), reasons.get(f"{section}.{key}", "")))
    return out


# ---------------------------------------------------------------------------------------------
# HTML


def _data_uri_png(path_or_fig) -> str:
    if isinstance(path_or_fig, (str, Path)):
        data = Path(path_or_fig).read_bytes()
    else:
        import io

        buf = io.BytesIO()
        path_or_fig.savefig(buf, format="png", dpi=100)
        _plt().close(path_or_fig)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}
td:nth-child(3){text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.muted{color:#777}code{background:#f4f4f4}
.warn{color:#8a5300;background:#fff6e0;padding:4px 8px}
"""


def _train_ids_note(metrics: dict[str, Any], run: Run) -> list[str]:
    """A warning paragraph when evaluated images are in the run's training split."""
    n = metrics.get("n_train_ids")
    if not n:
        return []
    return [
        f"<p class='warn'>{n:,} of the {metrics['n_images']:,} images (n_train_ids) have the "
        f"ids of the run's training images (<code>{html.escape(str(run.split_path))}</code>)"
        ": if they are the same images, their metrics are optimistic. Evaluate with "
        "<code>--split val</code> for the validation images only.</p>"
    ]


def write_report(
    path: Path,
    metrics: dict[str, Any],
    *,
    run: Run,
    thresholds_path: Path | None,
    confusion_png: Path,
    curves_png: Path | None,
    overlays: dict[str, Overlay],
) -> Path:
    """One self-contained page: metrics, confusion matrix, training curves, post-processing,
    overlays."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ptxseg evaluation: {e(run.path.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>ptxseg evaluation of <code>{e(str(run))}</code></h1>",
        "<p>"
        f"Data: <code>{e(str(metrics.get('data', '')))}</code> "
        f"(layout {e(str(metrics.get('layout', '')))}, split {e(str(metrics.get('split', '')))})"
        f". {metrics['n_images']:,} images, {metrics['n_positive']:,} with pneumothorax. "
        f"Compared at {e(str(metrics.get('compared_at', '')))} resolution "
        f"(model {e(str(metrics.get('size', '')))} px), TTA {e(str(metrics.get('tta', '')))}."
        "</p>",
        *_train_ids_note(metrics, run),
        "<h2>Metrics</h2>",
        "<p class='muted'>pooled: one confusion matrix over all pixels of all images (the "
        "paper's metrics). per_image: SIIM-ACR mean Dice (an empty prediction on an empty mask "
        "scores 1), and mean Dice / IoU over images with pneumothorax. detection: an image is "
        "called positive when its mask is not empty; AUC of the image's max probability.</p>",
        _table(["section", "metric", "value", "note"], [list(r) for r in metric_rows(metrics)]),
        "<h2>Confusion matrix</h2>",
        _img(_data_uri_png(confusion_png), "confusion matrix"),
        "<h2>Training curves</h2>",
    ]
    if curves_png is not None:
        parts.append(_img(_data_uri_png(curves_png), "training curves"))
    else:
        parts.append(
            f"<p class='muted'>No training curves (no usable {e(str(run.metrics_path))}).</p>"
        )

    parts.append("<h2>Post-processing</h2>")
    th = metrics.get("thresholds", {})
    parts.append(_table(["parameter", "value"], [[k, _fmt(v)] for k, v in th.items()]))
    thr_obj: dict[str, Any] = {}
    if metrics.get("thresholds_source") == "default":
        parts.append(
            f"<p class='warn'>Default rule: {e(str(run.thresholds_path))} not found (the run "
            "was not tuned), so thresholds_source is <code>default</code>: probs &gt; 0.5, no "
            f"component removal. Run <code>ptxseg tune {e(str(run))}</code> to choose them.</p>"
        )
    elif thresholds_path is not None and thresholds_path.exists():
        try:
            thr_obj = json.loads(thresholds_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            thr_obj = {}
        parts.append(f"<p>From <code>{e(str(thresholds_path))}</code>")
        if isinstance(thr_obj, dict) and "objective" in thr_obj:
            parts.append(
                f": chosen to maximise {e(str(thr_obj.get('objective')))} = "
                f"{e(_fmt(thr_obj.get('score')))} on {e(_fmt(thr_obj.get('n_images')))} "
                "validation images"
            )
        parts.append(".</p>")
        notes = thr_obj.get("warnings") if isinstance(thr_obj, dict) else None
        for note in notes if isinstance(notes, list) else []:
            parts.append(f"<p class='warn'>Tuning: {e(str(note))}</p>")
    grid = grid_figure(thr_obj)
    if grid is not None:
        parts.append(_img(_data_uri_png(grid), "grid search"))

    parts.append("<h2>Cases</h2>")
    if not overlays:
        parts.append("<p class='muted'>No cases to show.</p>")
    captions = {
        "best": "Best: highest Dice among images with a lesion or a prediction.",
        "worst": "Worst: lowest Dice.",
        "random": "Random sample.",
    }
    for name, overlay in overlays.items():
        parts.append(f"<h3>{e(captions.get(name, name))}</h3>")
        parts.append(_img(_data_uri_png(overlay.png), f"{name} cases"))
        parts.append(
            _table(
                ["id", "pneumothorax (true / predicted)", "Dice", "IoU", "true px", "pred px"],
                [
                    [
                        c.id,
                        f"{'yes' if c.has_pneumothorax else 'no'} / "
                        f"{'yes' if c.predicted_positive else 'no'}",
                        f"{c.dice:.4f}",
                        f"{c.iou:.4f}",
                        f"{c.true_area:,}",
                        f"{c.pred_area:,}",
                    ]
                    for c in overlay.cases
                ],
            )
        )
    parts.append("</body></html>\n")
    write_text(path, "\n".join(parts))
    return path
