"""The figures of an evaluation: overlay panels and grids, the confusion matrices, the
training curves and the grid-search heatmap, as PNG files (written atomically). The HTML page
that embeds them: :mod:`ptxseg.report`.

Figure titles are drawn with math parsing off, so a file called ``$x$.png`` is shown as text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ptxseg.fileio import save_figure
from ptxseg.metrics import ImageStats
from ptxseg.overlays import RESEARCH_USE, draw_overlay

if TYPE_CHECKING:
    from ptxseg.run import Run

TRAINING_CURVES_PNG = "training_curves.png"  # the run's curves, re-plotted into the report's out

PANEL_SIZE = 384  # longest side of an overlay panel, pixels
LEGEND = "vermillion solid = prediction (tinted), sky-blue dashed = ground truth"


def pyplot():
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


def make_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, stats: ImageStats,
               geometry=None) -> Panel:
    """The overlay tile of one case (``image`` gray uint8, any size; masks at the comparison
    resolution): :func:`ptxseg.overlays.draw_overlay` with the prediction's caption (finding,
    side, area, max probability; cm² with a ``geometry`` that has a pixel spacing,
    :mod:`ptxseg.measures`), titled with the case id, its Dice and true area."""
    from ptxseg.measures import measure
    from ptxseg.overlays import caption_for

    caption = caption_for(measure(pred, geometry, max_prob=stats.max_prob))
    rgb = draw_overlay(image, pred, gt, style="fill", caption=caption, max_side=PANEL_SIZE,
                       min_side=PANEL_SIZE, legend=False, notice=False)  # the title says it
    name = stats.id if len(stats.id) <= 32 else stats.id[:29] + "..."
    return Panel(rgb, f"{name}\nDice {stats.dice:.3f}, truth {stats.true_area:,} px")


def overlay_figure(panels: list[Panel], name: str):
    """A grid of panels (4 per row), each titled; constrained layout keeps every title clear
    of the row above."""
    plt = pyplot()
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
    fig.suptitle(f"{name} cases: {LEGEND}\n{RESEARCH_USE}", fontsize=10)
    return fig


def write_overlay(path: Path, panels: list[Panel], name: str) -> Path:
    """:func:`overlay_figure` as a PNG."""
    fig = overlay_figure(panels, name)
    try:
        save_figure(path, fig, dpi=100)
    finally:
        pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# confusion matrix, curves, grid


def write_confusion_matrix(path: Path, pooled: dict[str, Any]) -> Path:
    """:func:`confusion_figure` as a PNG."""
    fig = confusion_figure(pooled)
    try:
        save_figure(path, fig, dpi=100)
    finally:
        pyplot().close(fig)
    return path


def confusion_figure(pooled: dict[str, Any]):
    """The pooled pixel confusion matrix: counts (log colour scale, with its colour bar) and
    normalised by the true class (rows, with its colour bar)."""
    plt = pyplot()
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


def training_curves(runs: Run | Sequence[Run], out: Path) -> Path | None:
    """The training curves of the model's runs, into ``out/training_curves.png``.

    One run: its loss/IoU curves re-plotted from its epoch metrics (``ptxseg.plots``), else the
    run's own curves figure, else None. Several (an ensemble's members, a CV folder's folds):
    every one with a usable ``metrics.csv`` in one figure, named by its folder, else None."""
    from ptxseg.errors import PtxsegError
    from ptxseg.plots import plot_curves, plot_members, read_metrics

    runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    runs = list({r.path: r for r in runs}.values())
    if len(runs) > 1:
        named = {}
        for r in runs:
            try:
                named[r.path.name if r.path.name not in named else str(r.path)] = read_metrics(
                    r.metrics_path)
            except (PtxsegError, OSError, ValueError):
                continue
        if not named:
            return None
        plot_members(named, out / TRAINING_CURVES_PNG)
        return out / TRAINING_CURVES_PNG
    run = runs[0]
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
    plt = pyplot()
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
