"""Evaluate a run on any dataset: the paper's pooled-pixel metrics and more, streamed.

The model predicts in batches (:meth:`ptxseg.predictor.Predictor.file_probs`); each map is
post-processed by the one :func:`~ptxseg.postprocess.binarize`, compared with its ground truth
and reduced at once to pixel counts (:mod:`ptxseg.metrics`), so memory does not grow with the
dataset. By default masks are compared at the image's native resolution (probabilities resized
back, removal areas scaled); ``at="model"`` compares at model resolution with the ground truth
resized (nearest), as the paper did.

Outputs in ``out``: ``metrics.json`` (deterministic: same inputs, same bytes; with 95 %
bootstrap confidence intervals over images, :func:`ptxseg.metrics.bootstrap_cis`, seeded, the
seed recorded), ``per_image.csv`` (with the predicted lesion's measures,
:data:`PER_IMAGE_MEASURES`: cm² from the DICOM's pixel spacing, side),
``confusion_matrix.png``, ``overlays/{best,worst,random}.png`` and ``report.html`` (captions
with cm² where the image has a spacing).

Thresholds follow the one rule of :meth:`ptxseg.run.Run.thresholds` (shared with predict):
``--thresholds FILE``, else the run's tuned file, else the default rule with a warning;
``metrics.json`` records ``thresholds_source``. ``max_prob`` (per_image.csv, the
detection AUC) is the maximum of the probability map at MODEL resolution, before any resize,
as in predict's results.csv. ``n_train_ids`` counts the evaluated images that are in the run's
training split; evaluating ``--split all`` on them warns (use ``--split val``).
Warnings are Python warnings (the CLI shows each as one yellow line).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ptxseg.choices import Choice
from ptxseg.data.records import Record
from ptxseg.errors import PtxsegError, printable
from ptxseg.figures import TRAINING_CURVES_PNG
from ptxseg.fileio import csv_text, write_json, write_text
from ptxseg.measures import MEASURE_COLUMNS, Geometry, LesionMeasures, measure, read_geometry
from ptxseg.metrics import ImageStats, bootstrap_cis, image_stats, summarize
from ptxseg.postprocess import PostParams, area_scale, binarize
from ptxseg.progress import progress_bar
from ptxseg.run import Run, Split

if TYPE_CHECKING:
    from ptxseg.predictor import Predictor

METRICS_JSON = "metrics.json"
PER_IMAGE_CSV = "per_image.csv"
CONFUSION_PNG = "confusion_matrix.png"
REPORT_HTML = "report.html"
OVERLAYS = "overlays"
#: what an evaluation writes into its ``out`` (the report re-plots the training curves too)
OUTPUTS = (METRICS_JSON, PER_IMAGE_CSV, CONFUSION_PNG, REPORT_HTML, OVERLAYS, TRAINING_CURVES_PNG)
#: the overlay grids, ``overlays/<name>.png`` (:func:`select_cases`)
CASES = ("best", "worst", "random")
#: ``CV/out_of_fold/``: the out-of-fold report ``ptxseg tune CV`` writes (these same files)
OUT_OF_FOLD = "out_of_fold"


def output_files(out: Path) -> list[Path]:
    """Every file an evaluation may write into ``out`` (:data:`OUTPUTS`, the overlay grids
    one by one)."""
    return [out / name for name in OUTPUTS if name != OVERLAYS] + [
        out / OVERLAYS / f"{name}.png" for name in CASES
    ]


def older_evaluation(out: Path) -> set[Path] | None:
    """The files of an evaluation by an older ptxseg, which wrote no record: its metrics.json
    says what it is (``pooled``, ``compared_at``, ``thresholds_source``); else ``None``."""
    import json

    from ptxseg.errors import DataError
    from ptxseg.fileio import read_text

    try:
        info = json.loads(read_text(out / METRICS_JSON, METRICS_JSON))
    except (DataError, ValueError):
        return None
    if not isinstance(info, dict) or not {"pooled", "compared_at", "thresholds_source"} <= set(
        info
    ):
        return None
    return {p for p in output_files(out) if os.path.lexists(p)}


class At(Choice):
    """The resolution masks are compared at (``--at``)."""

    NATIVE = "native"
    MODEL = "model"


# ---------------------------------------------------------------------------------------------
# streamed prediction


@dataclass
class Prediction:
    """One image's probabilities and ground truth at the comparison resolution; ``max_prob``
    is the maximum of the probability map at model resolution (whatever ``at`` is).

    Shape:
        - probs: ``(H, W)`` float32 in [0, 1]
        - gt: ``(H, W)`` uint8 in {0, 1}
    """

    record: Record
    probs: np.ndarray
    gt: np.ndarray
    max_prob: float
    image: np.ndarray | None = None  # the native radiograph, with ``keep_image``
    geometry: Geometry | None = None  # pixel spacing and orientation, with ``geometry``


def iter_predictions(
    predictor: Predictor,
    records: Sequence[Record],
    *,
    at: str | At = At.NATIVE,
    progress: str | None = None,
    keep_image: bool = False,
    geometry: bool = False,
) -> Iterator[Prediction]:
    """Predict ``records`` in batches and yield each image's probabilities with its ground truth,
    at native resolution (``at="native"``) or model resolution (``at="model"``, ground truth
    resized with nearest neighbour). An unreadable image or mask raises ``DataError``.

    Args:
        progress: description of a progress bar; ``None`` shows none.
        keep_image: hand back each native radiograph (overlays).
        geometry: each image's :class:`~ptxseg.measures.Geometry` (a DICOM's header comes
            with its pixels: no second read).
    """
    from ptxseg.data.imageio import read_mask
    from ptxseg.data.resize import probs_to_native

    at = At.parse(at, "--at")
    size = predictor.size
    entries = [(r.id, r.image) for r in records]
    with progress_bar(enabled=progress is not None, rate=True) as bar:  # as predict's
        task = bar.add_task(progress or "", total=len(records), rate="")
        t0, done = time.perf_counter(), 0
        for item, probs in predictor.file_probs(entries, keep_image=keep_image,
                                                keep_header=geometry):
            record = records[item.index]
            if probs is None:
                raise PtxsegError(item.error or f"{item.path}: cannot read image")
            max_prob = float(probs.max())  # model resolution, as predict's (NaN propagates)
            if not math.isfinite(max_prob):
                raise PtxsegError(
                    f"{item.path}: the model's probabilities are not finite (NaN or inf); "
                    "nothing is written from them"
                )
            gt = read_mask(record.mask, (item.height, item.width))
            if at is At.NATIVE:
                out = probs_to_native(probs, item.height, item.width)
            else:
                out = probs
                if gt.shape != (size, size):
                    gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_NEAREST)
            geo = read_geometry(item.path, item.header) if geometry else None
            yield Prediction(record, out, gt, max_prob, item.image, geo)
            done += 1
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f} img/s")


def postprocess(pred: Prediction, params: PostParams) -> np.ndarray:
    """The binary mask of one prediction (areas scaled to its resolution)."""
    return binarize(pred.probs, params, area_scale=area_scale(params, *pred.probs.shape))


# ---------------------------------------------------------------------------------------------
# outputs


PER_IMAGE_COLUMNS = (
    "id",
    "has_pneumothorax",
    "predicted_pneumothorax",
    "dice",
    "iou",
    "true_area",
    "predicted_area",
    "max_prob",
    "tp",
    "fp",
    "fn",
)
#: the predicted lesion's measures in per_image.csv (``area_px`` is ``predicted_area`` and
#: ``max_prob`` is there already): :data:`ptxseg.measures.MEASURE_COLUMNS`
PER_IMAGE_MEASURES = tuple(c for c in MEASURE_COLUMNS if c not in ("area_px", "max_prob"))


def per_image_csv(stats: Sequence[ImageStats],
                  measures: Sequence[LesionMeasures] | None = None) -> str:
    """``per_image.csv``: one row per image (Dice/IoU of empty on empty = 1), and with
    ``measures`` (one per image, of the predicted mask) the :data:`PER_IMAGE_MEASURES`."""
    if measures is None:
        columns, extra = PER_IMAGE_COLUMNS, [[] for _ in stats]
    else:
        columns = PER_IMAGE_COLUMNS + PER_IMAGE_MEASURES
        keep = [MEASURE_COLUMNS.index(c) for c in PER_IMAGE_MEASURES]
        extra = [[printable(m.row()[i]) for i in keep] for m in measures]
    return csv_text(
        columns,
        (
            [
                s.id,
                int(s.has_pneumothorax),
                int(s.predicted_positive),
                repr(round(s.dice, 6)),
                repr(round(s.iou, 6)),
                s.true_area,
                s.pred_area,
                repr(round(s.max_prob, 6)),
                s.tp,
                s.fp,
                s.fn,
                *cells,
            ]
            for s, cells in zip(stats, extra, strict=True)
        ),
    )


def select_cases(stats: Sequence[ImageStats], n: int = 8, seed: int = 0) -> dict[str, list[int]]:
    """Indices of the best (highest Dice among images with a lesion or a prediction), worst
    (lowest Dice) and random cases, deterministic (ties broken by id)."""
    order = sorted(range(len(stats)), key=lambda i: stats[i].id)
    informative = [i for i in order if stats[i].has_pneumothorax or stats[i].predicted_positive]
    best = sorted(informative, key=lambda i: -stats[i].dice)[:n]
    worst = sorted(order, key=lambda i: stats[i].dice)[:n]
    worst = [i for i in worst if stats[i].dice < 1.0]
    rng = np.random.default_rng(seed)
    random = sorted(rng.choice(len(stats), size=min(n, len(stats)), replace=False).tolist())
    return {"best": best, "worst": worst, "random": random}


def evaluate_run(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    thresholds: str | Path | None = None,
    at: str | At = At.NATIVE,
    layout: str = "auto",
    split: str | Split = Split.ALL,
    tta: str = "none",
    batch_size: int | None = None,
    n_overlay: int = 8,
    progress: bool = False,
    rle: str | Path | None = None,
    backend: str = "torch",
    device: str = "auto",
    models: Sequence[str | Path] = (),
    overwrite: bool = False,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a run on a dataset and write every output (:data:`OUTPUTS`) into ``out``,
    under the one output-folder rule (:class:`ptxseg.outputs.OutputFolder`: checked before the
    model loads, locked, a previous evaluation's files replaced, anyone else's only with
    ``overwrite``).

    Args:
        run: run folder (its checkpoint, or its ONNX export with ``backend="onnx"``; its
            thresholds unless ``thresholds`` is given; its epoch metrics are plotted in the
            report when present), or a CV folder (its folds as one ensemble, its
            out-of-fold thresholds).
        models: run folders, CV folders, checkpoints or ONNX files to run instead of
            ``run``'s model, as one ensemble (``--model``, repeatable; ``run`` then gives the
            thresholds). ``metrics.json`` lists the ``members`` and how they ``combine``.
        data: dataset folder, any layout.
        out: output folder (created).
        thresholds: a thresholds file (must exist); default: :meth:`ptxseg.run.Run.thresholds`.
        at: ``native`` (default) or ``model`` resolution for the comparison.
        layout: dataset layout, ``auto`` detects.
        split: ``all`` images of ``data``, or only the run's ``val``/``train`` ids.
        tta, batch_size, backend, device: how the model runs (:class:`ptxseg.predictor.Predictor`).
        n_overlay: cases per overlay grid.
        progress: show a progress bar.
        rle: the run-length CSV of a siim folder (``--rle``).
        overwrite: replace existing files in ``out`` that no previous evaluation wrote.
        announce: called with the line that says what of a previous evaluation in ``out``
            was replaced and removed.

    Returns:
        the content of ``metrics.json``.

    Warns:
        UserWarning: no thresholds file (the default rule is used); ``split="all"`` includes
            images of the run's training split.
    """
    from ptxseg.cv import is_cv_dir
    from ptxseg.output_folder import OutputFolder
    from ptxseg.predictor import Predictor, member_sources

    out = Path(out)
    at, split = At.parse(at, "--at"), Split.parse(split, "--split")
    run = Run.open(run)
    if split is not Split.ALL and is_cv_dir(run.path):
        raise PtxsegError(
            f"{run.path}: --split {split} of a CV folder: each fold validated on other images "
            "(its out-of-fold score: ptxseg tune CV); evaluate one fold (CV/fold-I) with "
            "--split val, or the ensemble on data no fold trained on"
        )
    records, root, used_layout = run.records(data, layout, split, rle)
    sources = member_sources(run, list(models) or None, backend)
    read = [r.image for r in records] + [Path(thresholds) if thresholds else run.thresholds_path]
    read += [r.mask if isinstance(r.mask, Path) else Path(r.mask.source) for r in records
             if r.mask is not None]  # fmt: skip
    read += [path for _, path in sources] + [r.config_path for r, _ in sources]
    folder = OutputFolder(out, "evaluate", overwrite=overwrite, read_files=read,
                          legacy=older_evaluation)  # fmt: skip
    files = output_files(out)
    folder.check(files)  # before the model loads
    with folder.hold(files):
        predictor = Predictor.from_run(
            run, backend=backend, model=list(models) or None, device=device, tta=tta,
            batch_size=batch_size,
        )  # fmt: skip
        metrics = _evaluate(predictor, run, records, root, used_layout, folder,
                            thresholds=thresholds, at=at, split=split, n_overlay=n_overlay,
                            progress=progress)  # fmt: skip
        change = folder.finish()
    if change is not None and announce is not None:
        announce(change)
    return metrics


def _evaluate(predictor, run, records, root, used_layout, folder, *, thresholds, at, split,
              n_overlay, progress) -> dict[str, Any]:
    """:func:`evaluate_run` once ``folder`` is checked and held and the model loaded."""
    out = folder.out
    from ptxseg.cv import is_cv_dir

    rule = run.thresholds(thresholds, predictor.size)
    n_train_ids, train_note = _train_ids(predictor, records,
                                         cv=run.path if is_cv_dir(run.path) else None)
    n_tuned_ids, tuned_note = _tuned_ids(rule, run, records)
    optimistic = [note for n, note in ((n_train_ids if split is Split.ALL else 0, train_note),
                                       (n_tuned_ids, tuned_note)) if n]  # fmt: skip
    for note in optimistic:
        warnings.warn(note, UserWarning, stacklevel=2)
    stats: list[ImageStats] = []
    measures: list[LesionMeasures] = []
    geometries: list[Geometry | None] = []
    for pred in iter_predictions(
        predictor, records, at=at, progress="Evaluating" if progress else None, geometry=True
    ):
        mask = postprocess(pred, rule.params)
        stats.append(image_stats(pred.record.id, mask, pred.gt, pred.max_prob))
        measures.append(measure(mask, pred.geometry, max_prob=pred.max_prob))
        geometries.append(pred.geometry)

    summary = summarize(stats)
    metrics: dict[str, Any] = {
        "n_images": summary["n_images"],
        "n_positive": summary["n_positive"],
        "pooled": summary["pooled"],
        "per_image": summary["per_image"],
        "detection": summary["detection"],
        "confidence_intervals": bootstrap_cis(stats),
        "thresholds": rule.params.to_dict(),
        "thresholds_source": rule.source,
        "reasons": summary["reasons"],
        "compared_at": at,
        "size": predictor.size,
        "tta": predictor.tta,
        "split": split,
        "n_train_ids": n_train_ids,
        "n_tuned_ids": n_tuned_ids,
        "optimistic": optimistic,
        "data": str(root),
        "layout": used_layout,
        "checkpoint": predictor.members[0].path.name if len(predictor.members) == 1 else None,
        **predictor.record(),
    }
    folder.start(output_files(out))  # the previous evaluation's files go just before
    write_json(out / METRICS_JSON, metrics)
    write_text(out / PER_IMAGE_CSV, per_image_csv(stats, measures))
    _write_report(out, run, predictor, records, stats, geometries, metrics, rule, at, n_overlay)
    return metrics


def _train_ids(predictor: Predictor, records: Sequence[Record],
               cv: Path | None = None) -> tuple[int | None, str]:  # fmt: skip
    """How many of ``records`` are training images of a member's run (its ``split.csv``;
    ``None`` when no member's run has one), and the sentence that says so with the advice
    that fits (``cv``: the model is this CV folder's folds, which ``--split`` does not apply
    to)."""
    runs = {m.run.path: m.run for m in predictor.members
            if m.run is not None and m.run.split_path.is_file()}  # fmt: skip
    if not runs:
        return None, ""
    train: set[str] = set()
    for member_run in runs.values():
        train |= {i for i, side in member_run.split().items() if side == "train"}
    paths = [str(r.split_path) for r in runs.values()]
    if len(paths) == 1:
        shown = f"the run's training images ({paths[0]})"
        advice = ("evaluate with --split val for the validation images only, or on data the "
                  "model never saw")  # fmt: skip
    else:
        more = f" and {len(paths) - 2} more" if len(paths) > 2 else ""
        whose = "folds'" if cv is not None else "members'"
        shown = f"the {whose} training images ({', '.join(paths[:2])}{more})"
        advice = "evaluate the ensemble on data no member trained on"
        if cv is not None:
            advice = (
                "each image of a CV folder's data trained all its folds but one (--split does "
                "not apply): the score of images no fold trained on is the out-of-fold report "
                f"of ptxseg tune {cv} ({cv / OUT_OF_FOLD / REPORT_HTML}); else evaluate on "
                "data no fold trained on"
            )
    n = sum(1 for r in records if r.id in train)
    return n, (f"{n} of the {len(records)} images have the ids of {shown}: if they are the "
               f"same images, their metrics are optimistic; {advice}")  # fmt: skip


def _tuned_ids(rule, run: Run, records: Sequence[Record]) -> tuple[int | None, str]:
    """How many of ``records`` have the ids of the images the thresholds were tuned on (the
    ``tuned_ids`` of the thresholds file; a tune's file without them: its run's validation
    split, or all the images of a CV folder), ``None`` when unknown (the default rule, a
    hand-written file), and the sentence that says so."""
    import json

    from ptxseg.cv import is_cv_dir, read_manifest
    from ptxseg.fileio import read_text

    if rule.path is None:
        return None, ""
    try:
        obj = json.loads(read_text(rule.path, "thresholds file"))
    except (PtxsegError, ValueError):
        return None, ""
    if not isinstance(obj, dict) or "objective" not in obj:
        return None, ""
    ids = obj.get("tuned_ids")
    if isinstance(ids, list):
        tuned = {i for i in ids if isinstance(i, str)}
    elif Path(rule.path) == Path(run.thresholds_path) and is_cv_dir(run.path):
        tuned = set(read_manifest(run.path).assignment)  # out of fold: every image of the CV
    elif Path(rule.path) == Path(run.thresholds_path) and run.split_path.is_file():
        tuned = {i for i, side in run.split().items() if side == "val"}
    else:
        return None, ""
    n = sum(1 for r in records if r.id in tuned)
    return n, (f"{n} of the {len(records)} images have the ids of the images the thresholds "
               f"were tuned on ({rule.path}): if they are the same images, these scores are "
               "optimistic (the post-processing was chosen on them); evaluate on images that "
               "neither training nor tuning saw")  # fmt: skip


def _write_report(out, run, predictor, records, stats, geometries, metrics, rule, at,
                  n_overlay) -> None:
    """Overlays of the best, worst and random cases (captions with cm² where the image's
    ``geometries`` have a pixel spacing), the confusion matrix and report.html."""

    def again(indices: list[int]) -> Iterator[Prediction]:  # a few cases, predicted again
        return iter_predictions(predictor, [records[i] for i in indices], at=at,
                                keep_image=True)  # fmt: skip

    runs = [m.run for m in predictor.members if m.run is not None] or [run]
    write_outputs(out, run, again, stats, geometries, metrics, rule, n_overlay, runs)


def write_outputs(out: Path, run: Run, again: Callable[[list[int]], Iterator[Prediction]],
                  stats: Sequence[ImageStats], geometries: Sequence[Geometry | None],
                  metrics: dict[str, Any], rule, n_overlay: int,
                  curves_of: Sequence[Run]) -> None:  # fmt: skip
    """The figures and report.html of an evaluation (``out``'s files but metrics.json and
    per_image.csv): the best, worst and random cases (``again`` predicts the cases of the
    given indices of ``stats`` again, with their images), the confusion matrix, the training
    curves of ``curves_of`` (each member's run) and the page. Shared by evaluate and the
    out-of-fold report of ``tune CV``."""
    from ptxseg import figures, report  # matplotlib: only once there is something to draw

    # the few selected cases are predicted again (cheap) instead of keeping every map
    cases = select_cases(stats, n_overlay)
    wanted = sorted({i for idx in cases.values() for i in idx})
    panels: dict[int, figures.Panel] = {}
    if wanted:
        for k, pred in zip(wanted, again(wanted), strict=True):
            mask = postprocess(pred, rule.params)
            panels[k] = figures.make_panel(pred.image, pred.gt, mask, stats[k], geometries[k])
    overlays = {
        name: figures.Overlay(
            figures.write_overlay(out / OVERLAYS / f"{name}.png", [panels[i] for i in idx], name),
            [stats[i] for i in idx],
        )
        for name, idx in cases.items()
        if idx
    }
    figures.write_confusion_matrix(out / CONFUSION_PNG, metrics["pooled"])
    report.write_report(
        out / REPORT_HTML,
        metrics,
        run=run,
        thresholds_path=rule.path,
        confusion_png=out / CONFUSION_PNG,
        curves_png=figures.training_curves(curves_of, out),
        overlays=overlays,
    )
