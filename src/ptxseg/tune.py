"""Choose the post-processing rule on the validation split: predict once, search the grid.

The model runs once over the run's validation images. Each probability map (at model
resolution) is reduced at once to its sufficient statistics for the whole grid, then dropped:
for every threshold ``t`` the map is labelled once with OpenCV's connected components, and
the predicted area and true positives left after removing components smaller than each area
``a`` follow from the component sizes and their overlap with the ground truth (a vectorised
comparison, no re-labelling per area, no Python loop over pixels). The result is two small
integer arrays ``pred[n, t, a]`` and ``tp[n, t, a]`` (plus the true area of each image) from
which every grid point's pooled IoU or mean per-image Dice is computed without the model or
the maps. The column ``a = 0`` holds the counts above each threshold, which is all the
triplet rule needs.

Memory is therefore ``O(images x thresholds x areas)`` integers, not ``O(images x pixels)``.

The removal areas are the same FRACTIONS of the image at every model size: :data:`AREAS`
(0-4096 px) are pixels of a :data:`AREA_REFERENCE_SIZE` (512 px) input, and
:func:`areas_for` scales them to the run's ``data.size`` (0, 16, 32, 64, 128, 256 px at 128 px),
so the grid never removes a quarter of a small input. ``thresholds.json`` records the grid
used (``area_grid``).

Warnings (Python warnings; the CLI shows each as one yellow line, and ``thresholds.json`` keeps
them under ``warnings``): the chosen rule's pooled IoU on the validation split is below
:data:`NEAR_ZERO` (the model finds almost nothing: the thresholds are not meaningful), or the
Kaggle objective is tuned on a validation split without any pneumothorax.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ptxseg.choices import Choice
from ptxseg.metrics import ImageStats, dice_scores, iou_scores
from ptxseg.postprocess import CONNECTIVITY, Mode, PostParams, save_params

#: below the paper's lowest grid value (0.05), where its optimum sat, and up to 0.95
THRESHOLDS: tuple[float, ...] = (0.01, 0.02, 0.03, 0.04) + tuple(
    round(0.05 * i, 2) for i in range(1, 20)
)
#: small-component removal areas, pixels of an ``AREA_REFERENCE_SIZE`` px input (scaled to the
#: model's input by :func:`areas_for`)
AREAS: tuple[int, ...] = (0, 256, 512, 1024, 2048, 4096)
AREA_REFERENCE_SIZE = 512
#: ``--grid wide``: thresholds down to 0.001 and up to 0.999, removal areas up to 16384 px
#: of a 512 px input (6 % of the image), for a rule that the default grid puts on its edge
WIDE_THRESHOLDS: tuple[float, ...] = (0.001, 0.002, 0.005, *THRESHOLDS, 0.96, 0.97, 0.98,
                                      0.99, 0.995, 0.999)  # fmt: skip
WIDE_AREAS: tuple[int, ...] = (*AREAS, 8192, 16384)
#: below this pooled IoU on the validation split the chosen rule is not meaningful
NEAR_ZERO = 0.05


class Grid(Choice):
    """The grid searched (``--grid``): ``default`` (:data:`THRESHOLDS` x :data:`AREAS`) or
    ``wide`` (:data:`WIDE_THRESHOLDS` x :data:`WIDE_AREAS`)."""

    DEFAULT = "default"
    WIDE = "wide"

    def values_at(self, size: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """The thresholds and the removal areas in pixels of a ``size`` px input."""
        if self is Grid.WIDE:
            return WIDE_THRESHOLDS, areas_for(size, WIDE_AREAS)
        return THRESHOLDS, areas_for(size)


class Objective(Choice):
    """What the search maximises (``--objective``): ``iou``, the pooled-pixel IoU of the
    paper; ``kaggle``, the SIIM-ACR mean per-image Dice (empty on empty = 1)."""

    IOU = "iou"
    KAGGLE = "kaggle"


def areas_for(size: int, areas: tuple[int, ...] = AREAS) -> tuple[int, ...]:
    """The removal-area grid in pixels of a ``size`` x ``size`` model input: ``areas`` (pixels
    of a 512 px input, :data:`AREAS`) as the same fractions of the image (``areas * size**2 /
    512**2``, rounded; duplicates dropped). At 512 px it is ``areas`` itself."""
    scale = (size * size) / float(AREA_REFERENCE_SIZE * AREA_REFERENCE_SIZE)
    return tuple(dict.fromkeys(int(round(a * scale)) for a in areas))


# ---------------------------------------------------------------------------------------------
# statistics


def grid_counts(
    probs: np.ndarray,
    gt: np.ndarray,
    thresholds: tuple[float, ...] = THRESHOLDS,
    areas: tuple[int, ...] = AREAS,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted area and true positives of one image for every (threshold, removal area).

    ``pred[t, a]`` is the number of pixels of ``binarize(probs, PostParams(thresholds[t],
    areas[a]))`` and ``tp[t, a]`` how many of them are in ``gt``.

    Args:
        probs: probabilities (model resolution).
        gt: ground truth, {0,1}, same shape.
        thresholds: ascending.
        areas: removal areas in pixels.

    Shape:
        - probs, gt: ``(H, W)``
        - pred, tp: ``(len(thresholds), len(areas))`` int64
    """
    n_t, n_a = len(thresholds), len(areas)
    pred = np.zeros((n_t, n_a), np.int64)
    tp = np.zeros((n_t, n_a), np.int64)
    area_arr = np.asarray(areas, np.int64)
    keep_all = area_arr <= 1  # every component has at least one pixel
    p, g = probs, gt.astype(bool, copy=False)
    for ti, t in enumerate(thresholds):
        mask = p > t
        # every higher threshold's mask lies inside this one's bounding box: crop to it
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            break  # empty here, empty above
        cols = np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        p, g, mask = p[box], g[box], np.ascontiguousarray(mask[box])
        fg = int(np.count_nonzero(mask))
        fg_tp = int(np.count_nonzero(mask & g))
        keep_none = area_arr > fg  # no component is larger than the whole mask
        pred[ti, keep_all], tp[ti, keep_all] = fg, fg_tp
        undecided = ~(keep_all | keep_none)
        if not undecided.any():
            continue
        n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=CONNECTIVITY)
        if n == 2:  # one component: its size and overlap are already known
            sizes = np.array([fg], np.int64)
            overlap = np.array([fg_tp], np.int64)
        else:
            sizes = np.bincount(labels[mask], minlength=n)[1:].astype(np.int64)  # (K,)
            overlap = np.bincount(labels[g], minlength=n)[1:].astype(np.int64)
        keep = sizes[None, :] >= area_arr[undecided, None]  # (A', K)
        pred[ti, undecided] = keep @ sizes
        tp[ti, undecided] = keep @ overlap
    return pred, tp


@dataclass
class GridStats:
    """The grid's sufficient statistics of a set of images.

    Shape:
        - pred, tp: ``(N, T, A)`` int64 — predicted area / true positives per image and grid point
        - true_area: ``(N,)`` int64
    """

    thresholds: tuple[float, ...] = THRESHOLDS
    areas: tuple[int, ...] = AREAS
    pred: list[np.ndarray] = field(default_factory=list)
    tp: list[np.ndarray] = field(default_factory=list)
    true_area: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # each image's id ("" when not given)
    pixels: list[int] = field(default_factory=list)  # each map's pixel count
    max_prob: list[float] = field(default_factory=list)  # each map's maximum

    def add(self, probs: np.ndarray, gt: np.ndarray, ident: str = "") -> None:
        """Reduce one (probability map, ground truth) pair to its grid counts."""
        if probs.shape != gt.shape:
            raise ValueError(f"probabilities {probs.shape} and mask {gt.shape} differ in shape")
        pred, tp = grid_counts(probs, gt, self.thresholds, self.areas)
        self.pred.append(pred)
        self.tp.append(tp)
        self.true_area.append(int(np.count_nonzero(gt)))
        self.ids.append(ident)
        self.pixels.append(int(probs.size))
        self.max_prob.append(float(probs.max()) if probs.size else 0.0)

    def __len__(self) -> int:
        return len(self.true_area)

    @property
    def n_positive(self) -> int:
        """How many of the images have a pneumothorax (a non-empty ground truth)."""
        return sum(1 for a in self.true_area if a > 0)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.stack(self.pred), np.stack(self.tp), np.asarray(self.true_area, np.int64)


# ---------------------------------------------------------------------------------------------
# search


@dataclass
class TuneResult:
    params: PostParams
    objective: str
    score: float
    columns: list[str]
    rows: list[list[Any]]
    #: a CV folder's out-of-fold evaluation under ``params`` (its metrics.json), and where
    #: its report is
    evaluation: dict[str, Any] | None = None
    report: Path | None = None


def _objective(tp: np.ndarray, pred: np.ndarray, true_area: np.ndarray, objective: str):
    """Score every grid point; image axis first. ``true_area`` broadcasts against ``tp``."""
    fp = pred - tp
    fn = true_area - tp
    if objective == Objective.IOU:  # pooled over all pixels of all images (the paper's)
        return iou_scores(tp.sum(0), fp.sum(0), fn.sum(0), empty=0.0)
    return dice_scores(tp, fp, fn).mean(0)  # kaggle: mean per-image Dice, empty/empty = 1


def search(
    stats: GridStats, *, mode: str = "pixel", objective: str = "iou", size: int | None = None
) -> TuneResult:
    """The grid point with the best objective (first in grid order on ties: lowest
    threshold, then smallest area).

    pixel: threshold x removal area. triplet: top threshold x min area x bottom threshold
    (bottom <= top).
    """
    if len(stats) == 0:
        raise ValueError("no images to tune on")
    objective, mode = Objective.parse(objective, "--objective"), Mode.parse(mode, "--mode")
    pred, tp, true_area = stats.arrays()
    th = stats.thresholds
    if mode == "pixel":
        scores = _objective(tp, pred, true_area[:, None, None], objective)  # (T, A)
        rows = [
            [t, a, round(float(scores[i, j]), 6)]
            for i, t in enumerate(th)
            for j, a in enumerate(stats.areas)
        ]
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        params = PostParams(
            mode="pixel", binary_threshold=th[i], removal_area=int(stats.areas[j]), size=size
        )
        return TuneResult(
            params, objective, float(scores[i, j]), ["binary_threshold", "removal_area", "score"],
            rows,
        )
    if 0 not in stats.areas:
        raise ValueError("the triplet search needs area 0 in the grid (counts above thresholds)")
    a0 = stats.areas.index(0)
    above, tp_above = pred[:, :, a0], tp[:, :, a0]  # (N, T)
    min_areas = np.asarray(stats.areas, np.int64)
    rows = []
    best = (-1.0, None)
    for i, top in enumerate(th):
        n_top = above[:, i][:, None]  # (N, 1)
        positive = (n_top > 0) & (n_top >= min_areas[None, :])  # (N, M)
        bottoms = slice(0, i + 1)
        # (N, M, B): counts of the bottom mask where the image is called positive, else 0
        p_pred = np.where(positive[:, :, None], above[:, None, bottoms], 0)
        p_tp = np.where(positive[:, :, None], tp_above[:, None, bottoms], 0)
        scores = _objective(p_tp, p_pred, true_area[:, None, None], objective)  # (M, B)
        for m, area in enumerate(stats.areas):
            for k in range(i + 1):
                s = float(scores[m, k])
                rows.append([top, int(area), th[k], round(s, 6)])
                if s > best[0]:
                    best = (s, (top, int(area), th[k]))
    score, (top, area, bottom) = best
    params = PostParams(
        mode="triplet", top_threshold=top, min_area=area, bottom_threshold=bottom, size=size
    )
    columns = ["top_threshold", "min_area", "bottom_threshold", "score"]
    return TuneResult(params, objective, score, columns, rows)


def chosen_counts(stats: GridStats, params: PostParams) -> tuple[np.ndarray, np.ndarray]:
    """Predicted area and true positives of each image under ``params`` (a grid point).

    Shape:
        - pred, tp: ``(N,)`` int64
    """
    pred, tp, _ = stats.arrays()
    th = list(stats.thresholds)
    if params.mode == "pixel":
        i, j = th.index(params.binary_threshold), list(stats.areas).index(params.removal_area)
        return pred[:, i, j], tp[:, i, j]
    a0 = list(stats.areas).index(0)
    i, k = th.index(params.top_threshold), th.index(params.bottom_threshold)
    n_top = pred[:, i, a0]
    positive = (n_top > 0) & (n_top >= params.min_area)
    return np.where(positive, pred[:, k, a0], 0), np.where(positive, tp[:, k, a0], 0)


def chosen_image_stats(stats: GridStats, params: PostParams) -> list[ImageStats]:
    """Each image's :class:`~ptxseg.metrics.ImageStats` under ``params`` (a grid point), at
    model resolution: the counts of :func:`chosen_counts`, no second prediction."""
    pred, tp = chosen_counts(stats, params)
    out = []
    for i, ident in enumerate(stats.ids):
        p, t, true = int(pred[i]), int(tp[i]), int(stats.true_area[i])
        fp, fn = p - t, true - t
        out.append(ImageStats(ident, t, fp, fn, stats.pixels[i] - t - fp - fn,
                              stats.max_prob[i]))  # fmt: skip
    return out


def pooled_iou(stats: GridStats, params: PostParams) -> float | None:
    """Pooled IoU of ``params`` over the images of ``stats`` (``None`` without any lesion)."""
    pred, tp = chosen_counts(stats, params)
    true = int(np.sum(stats.true_area))
    union = int(pred.sum()) + true - int(tp.sum())
    return None if true == 0 else int(tp.sum()) / union


def tune_warnings(
    stats: GridStats, result: TuneResult, n_positive: int, where: str = "the validation split"
) -> list[str]:
    """What a user must know about a tuning result (empty when nothing is wrong); ``where``
    names the images tuned on."""
    if n_positive == 0:
        return [
            f"{where} ({len(stats)} images) has no pneumothorax: the "
            f"{result.objective} objective can only reward empty masks there; the chosen "
            "thresholds are not meaningful"
        ]
    iou = pooled_iou(stats, result.params)
    if iou is not None and iou < NEAR_ZERO:
        what = "best pooled IoU" if result.objective == "iou" else "pooled IoU of the chosen rule"
        return [
            f"the model finds almost nothing on {where} ({what} {iou:.3f}); the "
            "chosen thresholds are not meaningful"
        ]
    return []


def edge_note(result: TuneResult, grid: Grid = Grid.DEFAULT) -> str | None:
    """One line when the chosen rule lies on the edge of the grid and scores strictly better
    than its inner neighbour (the best may lie beyond the grid): a threshold that is the
    lowest or the highest searched, or an area that is the largest (area 0 is no removal:
    nothing lies below it). ``None`` otherwise, also on a plateau (a tie with the neighbour).
    """
    chosen = result.params.to_dict()
    names = result.columns[:-1]
    words = {"binary_threshold": "threshold", "top_threshold": "top threshold",
             "bottom_threshold": "bottom threshold", "removal_area": "removal area",
             "min_area": "minimum area"}  # fmt: skip
    score = {tuple(row[:-1]): row[-1] for row in result.rows}
    here = tuple(chosen[n] for n in names)
    for k, name in enumerate(names):
        values = sorted({row[k] for row in result.rows})
        v = chosen[name]
        area = "area" in name
        ends = [(values[-1], values[-2] if len(values) > 1 else None, "largest" if area
                 else "highest")]  # fmt: skip
        if not area:
            ends.append((values[0], values[1] if len(values) > 1 else None, "lowest"))
        for end, inner, what in ends:
            neighbour = score.get((*here[:k], inner, *here[k + 1:]))
            if v != end or neighbour is None or not score[here] > neighbour:
                continue
            shown = f"{v:g}" if not area else f"{v} px"
            wider = (
                "run tune again with --grid wide (thresholds 0.001-0.999, removal areas up to "
                f"{WIDE_AREAS[-1]} px of a {AREA_REFERENCE_SIZE} px input)"
                if grid is not Grid.WIDE else "it is the edge of the wide grid too"
            )
            return (
                f"the chosen {words.get(name, name)} {shown} is the {what} of the grid and "
                f"scores above its neighbour {inner:g}: the best may lie beyond it; {wider}"
            )
    return None


# ---------------------------------------------------------------------------------------------
# out-of-fold statistics


def pool_grid_stats(per_fold: Sequence[GridStats]) -> GridStats:
    """One :class:`GridStats` of all the folds' images: each fold's statistics (its model on
    its own validation images) concatenated, fold after fold.

    Raises:
        ValueError: no folds, or folds tuned on different grids.
    """
    if not per_fold:
        raise ValueError("no folds to pool")
    first = per_fold[0]
    pooled = GridStats(thresholds=tuple(first.thresholds), areas=tuple(first.areas))
    for i, stats in enumerate(per_fold):
        if tuple(stats.thresholds) != pooled.thresholds or tuple(stats.areas) != pooled.areas:
            raise ValueError(f"fold {i} was counted on another grid than fold 0")
        for name in ("pred", "tp", "true_area", "ids", "pixels", "max_prob"):
            getattr(pooled, name).extend(getattr(stats, name))
    return pooled


# ---------------------------------------------------------------------------------------------
# the command


def _say(progress: bool, text: str) -> None:
    """A stage line on stderr (with ``progress``): what tune is doing before each long step."""
    if progress:
        from ptxseg.progress import log_line

        log_line(f"tune: {text}")


def _grid_stats(predictor, records, progress: str | None, grid: Grid = Grid.DEFAULT) -> GridStats:
    """The grid statistics of ``records`` predicted once at model resolution (each image's id,
    pixel count and maximum probability kept)."""
    from ptxseg.evaluate import iter_predictions

    thresholds, areas = Grid.parse(grid, "--grid").values_at(predictor.size)
    stats = GridStats(thresholds=thresholds, areas=areas)
    for pred in iter_predictions(predictor, records, at="model", progress=progress):
        stats.add(pred.probs, pred.gt, pred.record.id)
    return stats


def _choose(
    stats: GridStats, *, objective: Objective, mode: Mode, size: int, where: str, what: str,
    grid: Grid = Grid.DEFAULT, progress: bool = False,
) -> tuple[TuneResult, list[str]]:
    """Search ``stats``: the result and its warnings (:func:`tune_warnings`; else the
    :func:`edge_note`); ``where`` names what a refusal is about (a file), ``what`` the images
    tuned on.

    Raises:
        PtxsegError: the IoU objective on images without any pneumothorax.
    """
    from ptxseg.errors import PtxsegError

    n_positive = stats.n_positive
    if objective is Objective.IOU and n_positive == 0:
        raise PtxsegError(
            f"{where}: the {len(stats)} validation images have no pneumothorax, so "
            "pooled IoU is undefined for every threshold; use --objective kaggle"
        )
    shape = (f"{len(stats.thresholds)} thresholds x {len(stats.areas)} removal areas"
             if mode is Mode.PIXEL else f"top x min area x bottom of {len(stats.thresholds)} "
             f"thresholds and {len(stats.areas)} areas")  # fmt: skip
    _say(progress, f"searching {shape} ({grid} grid, objective {objective}) on {len(stats)} "
                   "images")  # fmt: skip
    result = search(stats, mode=mode, objective=objective, size=size)
    notes = tune_warnings(stats, result, n_positive, what)
    edge = edge_note(result, grid) if not notes else None  # a rule that means nothing: no edge
    return result, notes + ([edge] if edge else [])


def _refuse_iou_without_lesions(records, objective: Objective, where: Path) -> None:
    """The refusal of :func:`_choose` before the model runs, where the records' labels are
    known (read from their masks): IoU on validation images without any pneumothorax."""
    from ptxseg.errors import PtxsegError

    labels = [r.has_pneumothorax for r in records]
    if objective is Objective.IOU and labels and not any(labels) and None not in labels:
        raise PtxsegError(
            f"{where}: the {len(records)} validation images have no pneumothorax, so "
            "pooled IoU is undefined for every threshold; use --objective kaggle"
        )


def check_thresholds_file(path: Path, overwrite: bool = False) -> str | None:
    """tune's rule for the file it writes, checked before the model loads: a
    ``thresholds.json`` that a tune wrote (it records its ``objective`` and ``grid``) is
    replaced; any other (a hand-written rule, something else of that name) only with
    ``overwrite``. Returns the rule it holds in words, for the line that says it was
    replaced (``None``: no file, or one without a readable rule).

    Raises:
        PtxsegError: the file is not tune's and not ``overwrite``, or it is not a regular file.
    """
    import json
    import os

    from ptxseg.errors import DataError, PtxsegError
    from ptxseg.fileio import not_regular, read_text
    from ptxseg.postprocess import params_from_dict

    if not os.path.lexists(path):
        return None
    kind = not_regular(path)
    if kind is not None:
        raise PtxsegError(f"{path}: is {kind}, not a thresholds file; tune cannot write it")
    try:
        obj = json.loads(read_text(path, "thresholds file"))
    except (DataError, ValueError):
        obj = None
    if not (isinstance(obj, dict) and "objective" in obj and "grid" in obj) and not overwrite:
        raise PtxsegError(
            f"{path}: exists and was not written by ptxseg tune (a hand-written rule?); "
            "refusing to replace it (--overwrite to replace it)"
        )
    try:
        return params_from_dict(obj, str(path)).describe()
    except (DataError, ValueError, TypeError):
        return None


def _save(
    path: Path, stats: GridStats, result: TuneResult, notes: list[str], extra: dict[str, Any],
    grid: Grid = Grid.DEFAULT,
) -> None:
    """Write the thresholds file (the rule, the search, the ids tuned on, ``extra``) and
    warn."""
    size = result.params.size
    base = WIDE_AREAS if grid is Grid.WIDE else AREAS
    save_params(result.params, path, extra={
        "objective": result.objective,
        "score": result.score,
        "n_images": len(stats),
        "n_positive": stats.n_positive,
        **extra,
        "warnings": notes,
        "search_grid": str(grid),
        "area_grid": {
            "areas": list(stats.areas),
            "size": size,
            "rule": f"removal areas {', '.join(map(str, base))} px of a {AREA_REFERENCE_SIZE} "
            f"px input, as the same fractions of this {size} px input",
        },
        "grid": {"columns": result.columns, "rows": result.rows},
        # what evaluate compares its images with: a score on them is optimistic
        "tuned_ids": sorted(i for i in stats.ids if i),
    })  # fmt: skip
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)


def _replaced(path: Path, previous: str | None, result: TuneResult) -> str | None:
    """The line that says a previous tune's rule was replaced (``None``: there was none)."""
    if previous is None:
        return None
    return f"{path}: replaced the previous tune's rule ({previous}) with {result.params.describe()}"


def tune_run(
    run: str | Path,
    data: str | Path | None = None,
    *,
    layout: str = "auto",
    objective: str | Objective = Objective.IOU,
    mode: str | Mode = Mode.PIXEL,
    batch_size: int | None = None,
    tta: str = "none",
    progress: bool = False,
    rle: str | Path | None = None,
    backend: str = "torch",
    device: str = "auto",
    grid: str | Grid = Grid.DEFAULT,
    overwrite: bool = False,
    announce: Callable[[str], None] | None = None,
) -> tuple[Path, TuneResult]:
    """Predict the run's validation split once and write the run's thresholds file.

    The removal areas searched are :func:`areas_for` the model's input size (recorded in
    ``thresholds.json`` as ``area_grid``), the images' ids as ``tuned_ids``.

    Args:
        run: a run folder (its checkpoint or, with ``backend="onnx"``, its export; its split).
        data: the dataset the run was trained on; default: the one the run recorded.
        layout: dataset layout (``auto`` detects it).
        objective: ``iou`` (pooled, the paper's) or ``kaggle`` (mean per-image Dice).
        mode: ``pixel`` (threshold + removal area) or ``triplet``.
        tta: recorded in thresholds.json; with batch_size, backend and device: how the model
            runs (:class:`ptxseg.predictor.Predictor`).
        progress: stage lines and a progress bar on stderr.
        rle: the run-length CSV of a siim folder (``--rle``; default: the run's recorded one).
        grid: ``default`` or ``wide`` (:class:`Grid`).
        overwrite: replace a ``thresholds.json`` that no tune wrote
            (:func:`check_thresholds_file`).
        announce: called with the line that says a previous tune's rule was replaced.

    Returns:
        the path written and the search result.

    Warns:
        UserWarning: see :func:`tune_warnings` and :func:`edge_note` (also written to
            ``thresholds.json``).
    """
    from ptxseg.predictor import Predictor
    from ptxseg.run import Run, Split

    objective, mode = Objective.parse(objective, "--objective"), Mode.parse(mode, "--mode")
    grid = Grid.parse(grid, "--grid")
    run = Run.open(run)
    previous = check_thresholds_file(run.thresholds_path, overwrite)
    records, data_root, used_layout = run.records(data, layout, Split.VAL, rle)
    _refuse_iou_without_lesions(records, objective, run.split_path)  # before 22 s of work
    predictor = Predictor.from_run(
        run, backend=backend, device=device, tta=tta, batch_size=batch_size
    )
    _say(progress, f"{run.path}: predicting its {len(records)} validation images "
                   f"({run.split_path}) with {predictor.description}")  # fmt: skip
    stats = _grid_stats(predictor, records, "Predicting validation split" if progress else None,
                        grid)  # fmt: skip
    result, notes = _choose(
        stats, objective=objective, mode=mode, size=predictor.size, where=str(run.split_path),
        what="the validation split", grid=grid, progress=progress,
    )  # fmt: skip
    extra = {"data": str(data_root), "layout": used_layout, "tta": predictor.tta}
    _save(run.thresholds_path, stats, result, notes, extra, grid)
    line = _replaced(run.thresholds_path, previous, result)
    if line is not None and announce is not None:
        announce(line)
    return run.thresholds_path, result


def tune_cv(
    cv_dir: str | Path,
    data: str | Path | None = None,
    *,
    layout: str = "auto",
    objective: str | Objective = Objective.IOU,
    mode: str | Mode = Mode.PIXEL,
    batch_size: int | None = None,
    tta: str = "none",
    progress: bool = False,
    rle: str | Path | None = None,
    backend: str = "torch",
    device: str = "auto",
    grid: str | Grid = Grid.DEFAULT,
    overwrite: bool = False,
    announce: Callable[[str], None] | None = None,
) -> tuple[Path, TuneResult]:
    """Choose the post-processing of a CV folder on its out-of-fold predictions, write
    ``CV/thresholds.json`` (what ``evaluate``/``predict`` of the CV's ensemble apply) and the
    out-of-fold report ``CV/out_of_fold/`` (:func:`write_out_of_fold`).

    Each fold's model predicts its own validation images only (the fold of ``cv.json`` its
    run validated on), so every image is predicted once, by the model that did not train on
    it; the folds' grid statistics are pooled (:func:`pool_grid_stats`) and searched as one
    set, as :func:`tune_run` searches one split. The file records the folds' image counts and
    each fold's pooled IoU under the chosen rule (``out_of_fold``). Arguments as
    :func:`tune_run`; ``data``: default, the dataset the folds recorded; ``overwrite`` also
    replaces files in ``CV/out_of_fold/`` that no tune wrote.

    Raises:
        RunDirError: not a CV folder, a fold not trained, a fold whose ``split.csv`` does not
            validate on its fold of ``cv.json``.

    Warns:
        UserWarning: see :func:`tune_warnings` and :func:`edge_note` (also written to
            ``thresholds.json``).
    """
    from ptxseg.cv import MANIFEST, trained_folds
    from ptxseg.errors import RunDirError
    from ptxseg.evaluate import OUT_OF_FOLD, REPORT_HTML, output_files
    from ptxseg.output_folder import OutputFolder
    from ptxseg.predictor import Predictor
    from ptxseg.run import Run, Split

    objective, mode = Objective.parse(objective, "--objective"), Mode.parse(mode, "--mode")
    grid = Grid.parse(grid, "--grid")
    manifest, runs = trained_folds(cv_dir)
    where = Path(cv_dir) / MANIFEST
    thresholds_path = Run(cv_dir).thresholds_path
    previous = check_thresholds_file(thresholds_path, overwrite)
    # the dataset is read once; each fold predicts its own fold of it
    all_records, data_root, used_layout = runs[0].records(data, layout, Split.ALL, rle)
    by_id = {r.id: r for r in all_records}
    report = OutputFolder(Path(cv_dir) / OUT_OF_FOLD, "tune", overwrite=overwrite,
                          read_files=[r.image for r in all_records])  # fmt: skip
    files = output_files(report.out)
    report.check(files)
    with report.hold(files):
        per_fold: list[GridStats] = []
        predictors = []
        size, tta_used = None, str(tta)
        for i, run in enumerate(runs):  # each fold's split.csv checked by trained_folds
            missing = [ident for ident in manifest.val_ids(i) if ident not in by_id]
            if missing:
                raise RunDirError(
                    f"{where}: fold {i}'s image {missing[0]} is not in {data_root} "
                    f"({len(missing)} missing)"
                )
            records = sorted((by_id[ident] for ident in manifest.val_ids(i)),
                             key=lambda r: r.id)  # fmt: skip
            predictor = Predictor.from_run(
                run, backend=backend, device=device, tta=tta, batch_size=batch_size
            )
            _say(progress, f"fold {i} of {manifest.k}: {run.path} predicts its "
                           f"{len(records)} validation images")  # fmt: skip
            if size is not None and predictor.size != size:
                raise RunDirError(
                    f"{cv_dir}: the folds' models take different input sizes "
                    f"({manifest.folds[0]} {size} px, {manifest.folds[i]} {predictor.size} px)"
                )
            size = predictor.size
            text = f"Fold {i}: predicting its validation images" if progress else None
            per_fold.append(_grid_stats(predictor, records, text, grid))
            predictors.append(predictor)
            tta_used = predictor.tta
        stats = pool_grid_stats(per_fold)
        what = f"the out-of-fold predictions of the {manifest.k} folds"
        result, notes = _choose(
            stats, objective=objective, mode=mode, size=size, where=str(where), what=what,
            grid=grid, progress=progress,
        )  # fmt: skip
        folds = [
            {
                "run": manifest.folds[i],
                "n_images": len(fold_stats),
                "n_positive": fold_stats.n_positive,
                "pooled_iou": pooled_iou(fold_stats, result.params),
            }
            for i, fold_stats in enumerate(per_fold)
        ]
        extra = {
            "data": str(data_root),
            "layout": used_layout,
            "tta": tta_used,
            "out_of_fold": {"k": manifest.k, "folds": folds},
        }
        _save(thresholds_path, stats, result, notes, extra, grid)
        _say(progress, f"writing the out-of-fold report into {report.out}")
        result.evaluation = write_out_of_fold(report, Run(cv_dir), runs, predictors, per_fold,
                                              by_id, result, thresholds_path, extra)
        result.report = report.out / REPORT_HTML
        change = report.finish()
    for line in (_replaced(thresholds_path, previous, result), change):
        if line is not None and announce is not None:
            announce(line)
    return thresholds_path, result


def write_out_of_fold(folder, cv_run, runs, predictors, per_fold: Sequence[GridStats], by_id,
                      result: TuneResult, thresholds_path: Path,
                      extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The out-of-fold report, evaluate's files in ``CV/out_of_fold/`` (``folder``, held):
    metrics.json, per_image.csv, the confusion matrix, the best / worst / random cases (each
    predicted again by its fold), the folds' training curves, the grid heatmap and
    report.html. Every image is scored at model resolution under the chosen rule from the
    grid counts (no second pass); the rule was chosen on these very predictions, so the page
    and metrics.json say the post-processing's scores are optimistic. Returns metrics.json's
    content."""
    from ptxseg.evaluate import (
        METRICS_JSON,
        PER_IMAGE_CSV,
        iter_predictions,
        output_files,
        per_image_csv,
        write_outputs,
    )
    from ptxseg.fileio import write_json, write_text
    from ptxseg.metrics import bootstrap_cis, summarize
    from ptxseg.run import Thresholds

    out = folder.out
    stats = pool_grid_stats(per_fold)
    images = chosen_image_stats(stats, result.params)
    fold_of = [i for i, fold_stats in enumerate(per_fold) for _ in range(len(fold_stats))]
    summary = summarize(images)
    n = len(images)
    metrics: dict[str, Any] = {
        "n_images": summary["n_images"],
        "n_positive": summary["n_positive"],
        "pooled": summary["pooled"],
        "per_image": summary["per_image"],
        "detection": summary["detection"],
        "confidence_intervals": bootstrap_cis(images),
        "thresholds": result.params.to_dict(),
        "thresholds_source": str(thresholds_path),
        "reasons": summary["reasons"],
        "compared_at": "model",
        "size": result.params.size,
        "tta": extra["tta"],
        "split": "out-of-fold",
        "n_train_ids": 0,
        "n_tuned_ids": n,
        "optimistic": [
            f"{n} of the {n} images are those the thresholds were tuned on ({thresholds_path}):"
            " the post-processing was chosen on these very predictions, so these scores are "
            "optimistic for it (no fold trained on the image it predicted)"
        ],
        "data": extra["data"],
        "layout": extra["layout"],
        "checkpoint": None,
        "members": [str(p.members[0].path) for p in predictors],
        "combine": "out of fold: each image predicted by the one fold that did not train on it",
        "out_of_fold": extra["out_of_fold"],
    }
    rule = Thresholds(result.params, thresholds_path)

    def again(indices: list[int]):
        for i in indices:
            yield from iter_predictions(predictors[fold_of[i]], [by_id[stats.ids[i]]],
                                        at="model", keep_image=True)  # fmt: skip

    folder.start(output_files(out))
    write_json(out / METRICS_JSON, metrics)
    write_text(out / PER_IMAGE_CSV, per_image_csv(images))
    write_outputs(out, cv_run, again, images, [None] * n, metrics, rule, 8, runs)
    return metrics
