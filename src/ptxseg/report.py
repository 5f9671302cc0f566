"""The self-contained HTML report of an evaluation (its figures: :mod:`ptxseg.figures`).

Everything a dataset names (ids, file names, paths) is HTML-escaped before it reaches the page,
so a file called ``<script>x</script>.png`` is shown as text. Images are embedded as base64
PNG data URIs: the report is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptxseg.errors import DataError
from ptxseg.figures import Overlay, grid_figure, pyplot
from ptxseg.fileio import read_bytes, read_json, write_text

if TYPE_CHECKING:
    from ptxseg.run import Run

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


def ci_label(metrics: dict[str, Any]) -> str:
    """The CI column's short header, e.g. ``95% CI``."""
    cis = metrics.get("confidence_intervals")
    level = cis.get("level", 0.95) if isinstance(cis, dict) else 0.95
    return f"{100 * float(level):g}% CI"


def ci_header(metrics: dict[str, Any]) -> str:
    """The CI column's header, e.g. ``95% CI (bootstrap over images, 2,000 resamples)``."""
    cis = metrics.get("confidence_intervals")
    label = ci_label(metrics)
    n = cis.get("n_resamples") if isinstance(cis, dict) else None
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
        data = read_bytes(path_or_fig, "figure", limit=None)
    else:
        import io

        buf = io.BytesIO()
        path_or_fig.savefig(buf, format="png", dpi=100)
        pyplot().close(path_or_fig)
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
        f'<table class="cm"><caption>Images ({neg + pos:,}): counts and share of the true class'
        "<br>(positive: a mask that is not empty)</caption>"
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
table.cm caption{caption-side:top;text-align:left;color:#555;padding-bottom:4px;
white-space:nowrap}
table.cm th{background:#f4f4f4;font-weight:normal}
"""


def _optimistic_notes(metrics: dict[str, Any]) -> list[str]:
    """A warning paragraph for each reason the scores are optimistic (``optimistic`` of
    metrics.json: evaluated images the model trained on, or the thresholds were tuned on)."""
    notes = metrics.get("optimistic")
    return [f"<p class='warn'>Optimistic scores: {html.escape(str(note))}.</p>"
            for note in (notes if isinstance(notes, list) else [])]  # fmt: skip


def model_sentence(metrics: dict[str, Any], run: Run) -> str:
    """What the model is, in words: one checkpoint, an ensemble of a CV folder's K folds or of
    N models (the mean of their probabilities), or the folds out of fold."""
    members = metrics.get("members")
    members = [str(m) for m in members] if isinstance(members, list) else []
    oof = metrics.get("out_of_fold")
    if isinstance(oof, dict):
        return (
            f"Model: the {len(members)} folds of <code>{html.escape(str(run))}</code> out of "
            "fold: each image predicted by the one fold that did not train on it."
        )
    if len(members) > 1:
        from ptxseg.cv import is_cv_dir

        what = (f"an ensemble of the {len(members)} folds of the CV folder "
                f"<code>{html.escape(str(run))}</code>" if is_cv_dir(run.path)
                else f"an ensemble of {len(members)} models")  # fmt: skip
        listed = ", ".join(f"<code>{html.escape(m)}</code>" for m in members)
        return f"Model: {what} (the mean of their probabilities): {listed}."
    if members:
        return f"Model: <code>{html.escape(members[0])}</code>."
    return ""


def _thresholds_sentence(thresholds_path: Path, thr_obj: Any) -> str:
    """``From <code>FILE</code>: chosen to maximise iou = 0.095 on 4 validation images.``"""
    e = html.escape
    text = f"<p>From <code>{e(str(thresholds_path))}</code>"
    if isinstance(thr_obj, dict) and "objective" in thr_obj:
        n = thr_obj.get("n_images")
        where = ("images, each predicted out of fold" if "out_of_fold" in thr_obj
                 else "validation images")  # fmt: skip
        text += (
            f": chosen to maximise {e(str(thr_obj.get('objective')))} = "
            f"{e(_fmt(thr_obj.get('score')))}"
            + (f" on {e(_fmt(n))} {where}" if n is not None else "")
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
    kind = "out-of-fold evaluation" if "out_of_fold" in metrics else "evaluation"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ptxseg {kind}: {e(run.path.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>ptxseg {kind} of <code>{e(str(run))}</code></h1>",
        f"<p>{model_sentence(metrics, run)}</p>",
        "<p>"
        f"Data: <code>{e(str(metrics.get('data', '')))}</code> "
        f"(layout {e(str(metrics.get('layout', '')))}, split {e(str(metrics.get('split', '')))})"
        f". {metrics['n_images']:,} images, {metrics['n_positive']:,} with pneumothorax. "
        f"Compared at {e(str(metrics.get('compared_at', '')))} resolution "
        f"(model {e(str(metrics.get('size', '')))} px), TTA {e(str(metrics.get('tta', '')))}."
        "</p>",
        *_optimistic_notes(metrics),
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
        from ptxseg.cv import is_cv_dir

        where = (f"{e(str(run.path))}/fold-*/{e(run.metrics_path.name)}" if is_cv_dir(run.path)
                 else e(str(run.metrics_path)))  # fmt: skip
        parts.append(f"<p class='muted'>No training curves (no usable {where}).</p>")

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
            thr_obj = read_json(thresholds_path, "thresholds file")
        except DataError:
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
