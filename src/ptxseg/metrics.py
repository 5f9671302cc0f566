"""Segmentation metrics, in segmentation_models.pytorch's style: statistics first (per-image
``tp, fp, fn, tn`` pixel counts, areas, max probability), reductions second (pooled over all
pixels, per-image means, image-level detection). One set of counts serves every metric.

Conventions (stated once, used everywhere):

- pooled metrics (the paper's): pixels of all images summed into one confusion matrix;
- per-image Dice/IoU of an empty prediction on an empty mask is 1 (the SIIM-ACR rule);
- a value whose denominator is zero (e.g. specificity with no negative image) is ``None`` and
  the reason is recorded, never NaN.

Counts are Python ints: pooled over thousands of 1024x1024 images they exceed int32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class ImageStats:
    """Pixel counts of one image's prediction against its ground truth.

    ``true_area = tp + fn``, ``pred_area = tp + fp``; ``max_prob`` is the image's highest
    probability (its image-level score).
    """

    id: str
    tp: int
    fp: int
    fn: int
    tn: int
    max_prob: float

    @property
    def true_area(self) -> int:
        return self.tp + self.fn

    @property
    def pred_area(self) -> int:
        return self.tp + self.fp

    @property
    def has_pneumothorax(self) -> bool:
        return self.true_area > 0

    @property
    def predicted_positive(self) -> bool:
        return self.pred_area > 0

    @property
    def dice(self) -> float:
        return float(dice_scores(self.tp, self.fp, self.fn))

    @property
    def iou(self) -> float:
        return float(iou_scores(self.tp, self.fp, self.fn))


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of two same-shape {0,1} masks (any integer/bool dtype).

    Shape:
        - pred, gt: ``(H, W)`` (or any equal shapes)
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    p = pred.astype(bool, copy=False)
    g = gt.astype(bool, copy=False)
    pred_area = int(np.count_nonzero(p))
    true_area = int(np.count_nonzero(g))
    tp = int(np.count_nonzero(p & g))
    fp = pred_area - tp
    fn = true_area - tp
    tn = int(p.size) - tp - fp - fn
    return tp, fp, fn, tn


def image_stats(ident: str, pred: np.ndarray, gt: np.ndarray, max_prob: float) -> ImageStats:
    """Statistics of one image (see :class:`ImageStats`)."""
    tp, fp, fn, tn = confusion_counts(pred, gt)
    return ImageStats(ident, tp, fp, fn, tn, float(max_prob))


# ---------------------------------------------------------------------------------------------
# element-wise scores (arrays broadcast; used by the tuner on whole grids at once)


def dice_scores(tp, fp, fn, empty: float = 1.0) -> np.ndarray:
    """Element-wise Dice ``2tp / (2tp + fp + fn)``; ``empty`` where the denominator is 0
    (empty prediction on an empty mask)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), empty)


def iou_scores(tp, fp, fn, empty: float = 1.0) -> np.ndarray:
    """Element-wise IoU ``tp / (tp + fp + fn)``; ``empty`` where the denominator is 0."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    den = tp + fp + fn
    return np.where(den > 0, tp / np.maximum(den, 1), empty)


# ---------------------------------------------------------------------------------------------
# reductions


class _Reasons:
    """Collects why a value is undefined: ``{"section.key": "reason"}``."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def ratio(self, key: str, num: float, den: float, reason: str) -> float | None:
        if den == 0:
            self.items[key] = reason
            return None
        return float(num) / float(den)


def pooled_metrics(
    tp: int, fp: int, fn: int, tn: int, reasons: _Reasons | None = None
) -> dict[str, Any]:
    """The paper's metrics: one confusion matrix over all pixels of all images.

    Returns ``{accuracy, recall, precision, f1, iou, tn, fp, fn, tp}`` (ratios ``None`` where
    undefined, the reason recorded in ``reasons`` under ``pooled.<name>``).
    """
    r = reasons if reasons is not None else _Reasons()
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    return {
        "accuracy": r.ratio("pooled.accuracy", tp + tn, tp + fp + fn + tn, "no pixels"),
        "recall": r.ratio("pooled.recall", tp, tp + fn, "no positive pixel in the ground truth"),
        "precision": r.ratio("pooled.precision", tp, tp + fp, "no pixel predicted positive"),
        "f1": r.ratio(
            "pooled.f1", 2 * tp, 2 * tp + fp + fn, "no positive pixel in truth or prediction"
        ),
        "iou": r.ratio("pooled.iou", tp, tp + fp + fn, "no positive pixel in truth or prediction"),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def per_image_metrics(stats: Sequence[ImageStats], reasons: _Reasons | None = None) -> dict:
    """SIIM-ACR mean Dice over all images (empty/empty = 1) and mean Dice / IoU over images
    whose ground truth is not empty."""
    r = reasons if reasons is not None else _Reasons()
    tp, fp, fn = _arrays(stats, ("tp", "fp", "fn"))
    dice = dice_scores(tp, fp, fn)
    iou = iou_scores(tp, fp, fn)
    pos = (tp + fn) > 0
    n_pos = int(pos.sum())
    return {
        "kaggle_dice": r.ratio("per_image.kaggle_dice", dice.sum(), len(stats), "no images"),
        "dice_positive_mean": r.ratio(
            "per_image.dice_positive_mean", dice[pos].sum(), n_pos, "no positive image"
        ),
        "iou_positive_mean": r.ratio(
            "per_image.iou_positive_mean", iou[pos].sum(), n_pos, "no positive image"
        ),
    }


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (P*N), ties counted one half via average
    ranks). Raises ``ValueError`` unless both classes are present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative images")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average 1-based rank of each tie group
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_metrics(stats: Sequence[ImageStats], reasons: _Reasons | None = None) -> dict:
    """Image-level detection: an image is called positive when its post-processed mask is not
    empty. Sensitivity, specificity, and the AUC of the image's max probability, with the image
    confusion counts."""
    r = reasons if reasons is not None else _Reasons()
    truth = np.array([s.has_pneumothorax for s in stats], dtype=bool)
    called = np.array([s.predicted_positive for s in stats], dtype=bool)
    tp = int((truth & called).sum())
    fn = int((truth & ~called).sum())
    fp = int((~truth & called).sum())
    tn = int((~truth & ~called).sum())
    auc: float | None
    if truth.all() or not truth.any():
        missing = "negative" if truth.all() else "positive"
        r.items["detection.auc"] = f"no {missing} image (AUC needs both classes)"
        auc = None
    else:
        auc = roc_auc([s.max_prob for s in stats], truth)
    return {
        "sensitivity": r.ratio("detection.sensitivity", tp, tp + fn, "no positive image"),
        "specificity": r.ratio("detection.specificity", tn, tn + fp, "no negative image"),
        "auc": auc,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def summarize(stats: Sequence[ImageStats]) -> dict[str, Any]:
    """Every reduction of a list of image statistics, in ``metrics.json``'s layout (without
    ``thresholds``): ``n_images, n_positive, pooled, per_image, detection, reasons``."""
    reasons = _Reasons()
    tp, fp, fn, tn = (int(a.sum()) for a in _arrays(stats, ("tp", "fp", "fn", "tn")))
    return {
        "n_images": len(stats),
        "n_positive": sum(1 for s in stats if s.has_pneumothorax),
        "pooled": pooled_metrics(tp, fp, fn, tn, reasons),
        "per_image": per_image_metrics(stats, reasons),
        "detection": detection_metrics(stats, reasons),
        "reasons": reasons.items,
    }


def _arrays(stats: Sequence[ImageStats], names: Sequence[str]) -> list[np.ndarray]:
    return [np.array([getattr(s, n) for s in stats], dtype=np.int64) for n in names]


# ---------------------------------------------------------------------------------------------
# confidence intervals

#: the metrics :func:`bootstrap_cis` gives an interval for, as ``section.key`` of metrics.json
CI_METRICS = (
    "pooled.f1",  # pooled Dice
    "pooled.iou",
    "per_image.kaggle_dice",
    "detection.sensitivity",
    "detection.specificity",
)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK = 256  # resamples per block: bounds memory at _CHUNK x n_images counts


def _resample_scores(
    weights: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, dice: np.ndarray,
    truth: np.ndarray, called: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every CI metric of each resample; ``weights[b, i]`` is how many times image ``i`` is in
    resample ``b``. NaN where a resample leaves a metric undefined."""
    w = weights.astype(np.float64)
    stp, sfp, sfn = w @ tp, w @ fp, w @ fn
    n = w.sum(axis=1)
    pos, neg = w @ truth, w @ ~truth
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "pooled.f1": np.where(2 * stp + sfp + sfn > 0, 2 * stp / (2 * stp + sfp + sfn), np.nan),
            "pooled.iou": np.where(stp + sfp + sfn > 0, stp / (stp + sfp + sfn), np.nan),
            "per_image.kaggle_dice": np.where(n > 0, (w @ dice) / n, np.nan),
            "detection.sensitivity": np.where(pos > 0, (w @ (truth & called)) / pos, np.nan),
            "detection.specificity": np.where(neg > 0, (w @ (~truth & ~called)) / neg, np.nan),
        }


def bootstrap_cis(
    stats: Sequence[ImageStats],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals over images for :data:`CI_METRICS`.

    Resample ``b`` draws ``n`` images with replacement, ``rng.integers(0, n, size=n)`` of
    ``rng = numpy.random.default_rng(seed)``, ``b = 0, 1, ...`` in turn (drawn in blocks of
    rows, which numpy fills from the same stream); each metric is recomputed from the drawn
    images' pixel counts (pooled Dice = ``pooled.f1``, pooled IoU, SIIM-ACR per-image Dice,
    image-level sensitivity and specificity) and the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the resamples where the
    metric is defined. Same stats and seed, same intervals.

    Returns:
        ``{"method", "level", "n_resamples", "seed", "intervals": {"section.key": [lo, hi] or
        None}, "n_defined": {"section.key": resamples where it was defined}}``; an interval is
        ``None`` when no resample defines the metric (e.g. specificity without a negative
        image), or with no image at all.
    """
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1) (got {level!r})")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: must be positive (got {n_resamples!r})")
    n = len(stats)
    out: dict[str, Any] = {
        "method": "percentile bootstrap over images",
        "level": level,
        "n_resamples": n_resamples,
        "seed": seed,
        "intervals": dict.fromkeys(CI_METRICS),
        "n_defined": dict.fromkeys(CI_METRICS, 0),
    }
    if n == 0:
        return out
    tp, fp, fn = (a.astype(np.float64) for a in _arrays(stats, ("tp", "fp", "fn")))
    dice = dice_scores(tp, fp, fn)
    truth = (tp + fn) > 0
    called = (tp + fp) > 0
    rng = np.random.default_rng(seed)
    scores: dict[str, list[np.ndarray]] = {k: [] for k in CI_METRICS}
    rows = np.arange(_CHUNK)[:, None]
    for start in range(0, n_resamples, _CHUNK):
        k = min(_CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        weights = np.zeros((k, n), dtype=np.int64)
        np.add.at(weights, (rows[:k], idx), 1)
        for key, values in _resample_scores(weights, tp, fp, fn, dice, truth, called).items():
            scores[key].append(values)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    for key in CI_METRICS:
        values = np.concatenate(scores[key])
        values = values[~np.isnan(values)]
        out["n_defined"][key] = int(values.size)
        if values.size:
            lo, hi = np.percentile(values, q)
            out["intervals"][key] = [float(lo), float(hi)]
    return out
