"""Training curves from a run's ``metrics.csv``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from ptxseg.errors import DataError
from ptxseg.fileio import read_text, save_figure

METRICS_COLUMNS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "time_s")


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (``epoch`` as int).

    Raises:
        DataError: missing or unreadable file, a column missing, or a cell not a number.
    """
    path = Path(path)
    text = read_text(path, "metrics file", missing="metrics file not found")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    rows = list(reader)
    missing = [c for c in METRICS_COLUMNS if c not in header]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}")
    out = []
    for i, row in enumerate(rows, start=2):
        if any(row[k] is None for k in METRICS_COLUMNS):  # DictReader's fill for a short row
            raise DataError(path, f"line {i}: missing cell(s)")
        try:
            rec = {k: float(row[k]) for k in METRICS_COLUMNS}
        except ValueError as exc:
            raise DataError(path, f"line {i}: not a number ({exc})") from None
        rec["epoch"] = int(rec["epoch"])
        out.append(rec)
    return out


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> None:
    """Write ``out_png`` from a ``metrics.csv`` (see :func:`plot_rows`)."""
    plot_rows(read_metrics(metrics_csv), out_png)


def plot_rows(rows: Sequence[dict[str, float]], out_png: str | Path) -> None:
    """Write ``out_png`` (:func:`curves_figure` of rows as :func:`read_metrics` returns them),
    atomically."""
    fig = curves_figure(rows)
    try:
        save_figure(out_png, fig)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def curves_figure(rows: Sequence[dict[str, float]]):
    """Loss (train, val) and validation IoU/Dice per epoch, with the best IoU epoch marked (a
    dashed line and a circle, named in the legend, so no annotation runs off the plot)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", ms=3, label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("BCE + Dice loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_iou.plot(epochs, [r["val_iou"] for r in rows], "o-", ms=3, label="val IoU")
    ax_iou.plot(epochs, [r["val_dice"] for r in rows], "o-", ms=3, label="val Dice")
    if rows:
        best = max(rows, key=lambda r: r["val_iou"])
        ax_iou.axvline(
            best["epoch"], color="gray", ls="--", lw=1,
            label=f"best IoU {best['val_iou']:.3f} (epoch {best['epoch']})",
        )
        ax_iou.plot([best["epoch"]], [best["val_iou"]], "o", ms=7, mfc="none", mec="black")
    ax_iou.set_xlabel("epoch")
    ax_iou.set_ylabel("pooled pixels, threshold 0.5")
    ax_iou.set_ylim(0, 1)
    ax_iou.set_title("Validation IoU / Dice")
    ax_iou.grid(alpha=0.3)
    ax_iou.legend(loc="best", fontsize=8)
    for ax in (ax_loss, ax_iou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_members(named_rows: dict[str, Sequence[dict[str, float]]], out_png: str | Path) -> None:
    """Write ``out_png``: :func:`members_figure` of several runs' rows, atomically."""
    fig = members_figure(named_rows)
    try:
        save_figure(out_png, fig)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def members_figure(named_rows: dict[str, Sequence[dict[str, float]]]):
    """The curves of several runs in one figure (an ensemble's members, a CV folder's folds):
    one colour per run, named in the legend; loss (train solid, val dashed) and validation IoU,
    each run's best IoU epoch circled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, rows) in enumerate(named_rows.items()):
        color = colors[k % len(colors)]
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "-", color=color, lw=1.2,
                     label=f"{name} train")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--", color=color, lw=1.2,
                     label=f"{name} val")
        ax_iou.plot(epochs, [r["val_iou"] for r in rows], "o-", ms=3, color=color, label=name)
        if rows:
            best = max(rows, key=lambda r: r["val_iou"])
            ax_iou.plot([best["epoch"]], [best["val_iou"]], "o", ms=8, mfc="none", mec=color)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss (solid: train, dashed: val)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, ncol=2)
    ax_iou.set_xlabel("epoch")
    ax_iou.set_ylabel("pooled pixels, threshold 0.5")
    ax_iou.set_ylim(0, 1)
    ax_iou.set_title(f"Validation IoU of {len(named_rows)} runs (best circled)")
    ax_iou.grid(alpha=0.3)
    ax_iou.legend(loc="best", fontsize=8)
    for ax in (ax_loss, ax_iou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
