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
from ptxseg.overlays import PRED_RGB, TRUTH_RGB, draw_overlay  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ptxseg.run import Run

TRAINING_CURVES_PNG = "training_curves.png"  # the run's curves, re-plotted into the report's out

PANEL_SIZE = 384  # longest side of an overlay panel, pixels
GT_RGB = TRUTH_RGB  # the ground truth's colour (name kept for callers)
LEGEND = "vermillion solid = prediction (tinted), sky-blue dashed = ground truth"


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
    """Radiograph (gray uint8) with the ground truth (sky blue, dashed) and the prediction
    (vermillion, solid, tinted), RGB, no caption (:func:`ptxseg.overlays.draw_overlay`).

    Shape:
        - image, gt, pred: ``(H, W)``; output ``(h, w, 3)`` with the longest side PANEL_SIZE
          (smaller images enlarged, so that lines and dashes stay legible)
    """
    return draw_overlay(image, pred, gt, style="filled", max_side=PANEL_SIZE,
                        min_side=PANEL_SIZE)


def make_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, stats: ImageStats,
               geometry=None) -> Panel:
    """The overlay tile of one case (``image`` gray uint8, any size; masks at the comparison
    resolution): :func:`ptxseg.overlays.draw_overlay` with the prediction's caption (finding,
    side, area, max probability; cm² with a ``geometry`` that has a pixel spacing,
    :mod:`ptxseg.measures`), titled with the case id, its Dice and true area."""
    from ptxseg.measures import measure
    from ptxseg.overlays import caption_for

    caption = caption_for(measure(pred, geometry, max_prob=stats.max_prob))
    rgb = draw_overlay(image, pred, gt, style="filled", caption=caption, max_side=PANEL_SIZE,
                       min_side=PANEL_SIZE, legend=False)
    name = stats.id if len(stats.id) <= 32 else stats.id[:29] + "..."
    return Panel(rgb, f"{name}\nDice {stats.dice:.3f}, truth {stats.true_area:,} px")


def overlay_figure(panels: list[Panel], name: str):
    """A grid of panels (4 per row), each titled; constrained layout keeps every title clear
    of the row above."""
    plt = _plt()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    aspect = max(p.rgb.shape[0] / p.rgb.shape[1] for p in panels)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, (3.2 * aspect + 0.5) * rows + 0.4), squeeze=False,
        layout="constrained",
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        ax.imshow(panel.rgb)
        ax.set_title(panel.title, fontsize=8, parse_math=False)
    fig.suptitle(f"{name} cases: {LEGEND}", fontsize=10)
    return fig


def write_overlay(path: Path, panels: list[Panel], name: str) -> Path:
    """:func:`overlay_figure` as a PNG."""
    fig = overlay_figure(panels, name)
    try:
        save_figure(path, fig, dpi=100)
    finally:
        _plt().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# confusion matrix, curves, grid


def write_confusion_matrix(path: Path, pooled: dict[str, Any]) -> Path:
    """:func:`confusion_figure` as a PNG."""
    fig = confusion_figure(pooled)
    try:
        save_figure(path, fig, dpi=100)
    finally:
        _plt().close(fig)
    return path


def confusion_figure(pooled: dict[str, Any]):
    """The pooled pixel confusion matrix: counts (log colour scale, with its colour bar) and
    normalised by the true class (rows, with its colour bar)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    cm = np.array([[pooled["tn"], pooled["fp"]], [pooled["fn"], pooled["tp"]]], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    labels = ["background", "pneumothorax"]
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.3), layout="constrained")
    panels = (
        (axes[0], cm, "pixels (counts, log scale)", lambda v: f"{int(v):,}",
         LogNorm(vmin=1, vmax=max(10.0, cm.max()))),
        (axes[1], norm, "pixels, share of the true class", lambda v: f"{v:.3f}", None),
    )
    for ax, data, title, fmt, scale in panels:
        shown = np.maximum(data, 1) if scale is not None else data
        im = ax.imshow(shown, cmap="Blues", norm=scale,
                       **({} if scale is not None else {"vmin": 0, "vmax": 1}))
        fig.colorbar(im, ax=ax, shrink=0.8, pad=0.04)
        for (i, j), v in np.ndenumerate(data):
            level = im.norm(shown[i, j])
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=9,
                    color="white" if level > 0.6 else "black")
        ax.set_xticks([0, 1], ["background", "pneumo-\nthorax"])
        ax.set_yticks([0, 1], labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    fig.suptitle("All pixels of all images pooled", fontsize=11)
    return fig


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


def _grid_index(values: list[float], chosen: Any) -> int | None:
    if not isinstance(chosen, (int, float)) or isinstance(chosen, bool) or not values:
        return None
    i = int(np.argmin([abs(v - chosen) for v in values]))
    return i if math.isclose(values[i], chosen, rel_tol=1e-9, abs_tol=1e-9) else None


def grid_figure(thresholds_obj: dict[str, Any]):
    """Heatmap of a pixel-mode grid search (score by threshold x removal area) with the chosen
    cell (``binary_threshold``, ``removal_area`` of the file) outlined, or None."""
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
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(5.5, 6), layout="constrained")
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(areas)), [str(a) for a in areas])
    ax.set_yticks(range(len(ts)), [f"{t:g}" for t in ts])
    ax.set_xlabel("removal area (px at model resolution)")
    ax.set_ylabel("binary threshold")
    objective = str(thresholds_obj.get("objective", ""))
    title = f"grid search: {objective}"
    i = _grid_index(ts, thresholds_obj.get("binary_threshold"))
    j = _grid_index(areas, thresholds_obj.get("removal_area"))
    if i is not None and j is not None:
        for color, width in (("black", 4.0), ("white", 2.0)):  # visible on any viridis colour
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=color, lw=width))
        title += (
            f"\nchosen (outlined): threshold {ts[i]:g}, area {areas[j]}, "
            f"{objective} {table[i, j]:.3f}"
        )
    ax.set_title(title, fontsize=10, parse_math=False)
    fig.colorbar(im, ax=ax, label=objective or "score")
    return fig


# ---------------------------------------------------------------------------------------------
# tables


def ratio_text(value: float) -> str:
    """A ratio with 3 decimals, or more where 3 would round a value that is not exactly 0 or 1
    to ``0.000`` / ``1.000`` (pixel accuracy ``0.99873`` -> ``0.9987``), at most 6."""
    for decimals in range(3, 7):
        text = f"{value:.{decimals}f}"
        if value in (0.0, 1.0) or float(text) not in (0.0, 1.0):
            return text
    return f"{value:.6f}"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return ratio_text(value)
    return str(value)


def _param(value: Any) -> str:
    """A thresholds-file value as written (``0.45``, ``256``), not rounded."""
    if isinstance(value, float):
        return f"{value:g}"
    return _fmt(value)


METRIC_ROWS = (
    ("pooled", ("accuracy", "recall", "precision", "f1", "iou", "tn", "fp", "fn", "tp")),
    ("per_image", ("kaggle_dice", "dice_positive_mean", "iou_positive_mean")),
    ("detection", ("sensitivity", "specificity", "auc", "tp", "fp", "fn", "tn")),
)


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(section, metric, formatted value, reason-if-undefined) rows, in the report's order."""
    return [(s, k, v, r) for s, k, v, _, r in metric_table_rows(metrics)]


def ci_text(metrics: dict[str, Any], section: str, key: str) -> str:
    """``"0.412 - 0.538"``: the bootstrap interval of ``section.key`` in ``metrics`` (the
    ``confidence_intervals`` of :func:`ptxseg.metrics.bootstrap_cis`), or ``""``."""
    cis = metrics.get("confidence_intervals")
    intervals = cis.get("intervals", {}) if isinstance(cis, dict) else {}
    ci = intervals.get(f"{section}.{key}") if isinstance(intervals, dict) else None
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        return ""
    return f"{ratio_text(float(ci[0]))} - {ratio_text(float(ci[1]))}"


def ci_header(metrics: dict[str, Any]) -> str:
    """The CI column's header, e.g. ``95% CI (bootstrap, 2000 resamples)``."""
    cis = metrics.get("confidence_intervals")
    if not isinstance(cis, dict):
        return "95% CI"
    level = cis.get("level", 0.95)
    n = cis.get("n_resamples")
    label = f"{100 * float(level):g}% CI"
    return f"{label} (bootstrap over images, {n:,} resamples)" if isinstance(n, int) else label


def metric_table_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(section, metric, value, confidence interval or "", reason-if-undefined) rows."""
    reasons = metrics.get("reasons", {})
    out = []
    for section, keys in METRIC_ROWS:
        for key in keys:
            if key in metrics.get(section, {}):
                value = metrics[section][key]
                out.append((section, key, _fmt(value), ci_text(metrics, section, key),
                            reasons.get(f"{section}.{key}", "")))
    return out


def non_empty_columns(header: list[str], rows: list[list[Any]]) -> list[int]:
    """Indices of the columns with at least one non-empty cell (all of them without rows)."""
    if not rows:
        return list(range(len(header)))
    return [i for i in range(len(header)) if any(str(r[i]) != "" for r in rows)]


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


def _table(header: list[str], rows: list[list[Any]], *, numeric: tuple[int, ...] = ()) -> str:
    """An HTML table; columns whose cells are all empty are left out; ``numeric`` columns
    (indices into ``header``) are right-aligned."""
    e = html.escape
    keep = non_empty_columns(header, rows)

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{e(str(header[i]))}</th>" for i in keep)
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{e(str(row[i]))}</td>" for i in keep) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_confusion_html(detection: dict[str, Any]) -> str:
    """The image-level confusion matrix (an image is positive when its mask is not empty) as
    an HTML table: counts and the share of each true class, cells shaded by that share."""
    if not all(isinstance(detection.get(k), int) for k in ("tp", "fp", "fn", "tn")):
        return ""
    tn, fp, fn, tp = (detection[k] for k in ("tn", "fp", "fn", "tp"))

    def cell(count: int, row_total: int) -> str:
        share = count / row_total if row_total else 0.0
        text = f"{count:,}" + (f" ({100 * share:.0f}%)" if row_total else "")
        dark = share > 0.6
        style = f"background:rgba(8,81,156,{0.08 + 0.8 * share:.2f})" + (
            ";color:#fff" if dark else ""
        )
        return f'<td class="num" style="{style}">{text}</td>'

    neg, pos = tn + fp, fn + tp
    return (
        f'<table class="cm"><caption>Images ({neg + pos:,}): counts and share of the true '
        "class<br>(positive: a mask that is not empty)</caption>"
        "<thead><tr><th>true \\ predicted</th><th>negative</th><th>positive</th>"
        "</tr></thead><tbody>"
        f"<tr><th>negative</th>{cell(tn, neg)}{cell(fp, neg)}</tr>"
        f"<tr><th>positive</th>{cell(fn, pos)}{cell(tp, pos)}</tr>"
        "</tbody></table>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}
.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.muted{color:#777}code{background:#f4f4f4}
.warn{color:#8a5300;background:#fff6e0;padding:4px 8px}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:center}
table.cm caption{caption-side:top;text-align:left;color:#555;padding-bottom:4px}
table.cm th{background:#f4f4f4;font-weight:normal}
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


def _thresholds_sentence(thresholds_path: Path, thr_obj: Any) -> str:
    """``From <code>FILE</code>: chosen to maximise iou = 0.095 on 4 validation images.``"""
    e = html.escape
    text = f"<p>From <code>{e(str(thresholds_path))}</code>"
    if isinstance(thr_obj, dict) and "objective" in thr_obj:
        n = thr_obj.get("n_images")
        text += (
            f": chosen to maximise {e(str(thr_obj.get('objective')))} = "
            f"{e(_fmt(thr_obj.get('score')))}"
            + (f" on {e(_fmt(n))} validation images" if n is not None else "")
        )
    return text + ".</p>"


def _ci_sentence(metrics: dict[str, Any]) -> str:
    cis = metrics.get("confidence_intervals")
    if not isinstance(cis, dict):
        return ""
    return (
        f" Confidence intervals: {cis.get('method', 'bootstrap')}, {_fmt(cis.get('n_resamples'))}"
        f" resamples, seed {_fmt(cis.get('seed'))} (quantiles of the resampled metric)."
    )


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
        "paper's metrics; f1 is the pooled Dice). per_image: SIIM-ACR mean Dice (an empty "
        "prediction on an empty mask scores 1), and mean Dice / IoU over images with "
        "pneumothorax. detection: an image is called positive when its mask is not empty; AUC "
        "of the image's max probability."
        + _ci_sentence(metrics)
        + "</p>",
        _table(
            ["section", "metric", "value", ci_header(metrics), "note"],
            [list(r) for r in metric_table_rows(metrics)],
            numeric=(2, 3),
        ),
        "<h2>Confusion matrix</h2>",
        "<div class='row'>",
        _img(_data_uri_png(confusion_png), "pixel confusion matrix"),
        image_confusion_html(metrics.get("detection", {})),
        "</div>",
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
    parts.append(_table(["parameter", "value"], [[k, _param(v)] for k, v in th.items()],
                        numeric=(1,)))
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
        parts.append(_thresholds_sentence(thresholds_path, thr_obj))
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
                ["id", "pneumothorax (true / predicted)", "Dice", "IoU", "true px", "pred px",
                 "max p"],
                [
                    [
                        c.id,
                        f"{'yes' if c.has_pneumothorax else 'no'} / "
                        f"{'yes' if c.predicted_positive else 'no'}",
                        f"{c.dice:.3f}",
                        f"{c.iou:.3f}",
                        f"{c.true_area:,}",
                        f"{c.pred_area:,}",
                        f"{c.max_prob:.3f}",
                    ]
                    for c in overlay.cases
                ],
                numeric=(2, 3, 4, 5, 6),
            )
        )
    parts.append("</body></html>\n")
    write_text(path, "\n".join(parts))
    return path
