"""Evaluate a run on any dataset: the paper's pooled-pixel metrics and more, streamed.

The model predicts in batches (``inference.predict_probs``); each probability map is
post-processed by the one :func:`~ptxseg.postprocess.binarize`, compared with its ground truth
and reduced at once to pixel counts (:mod:`ptxseg.metrics`), so memory does not grow with the
dataset. By default masks are compared at the image's native resolution (probabilities resized
back, removal areas scaled); ``at="model"`` compares at model resolution with the ground truth
resized (nearest), as the paper did.

Outputs in ``out``: ``metrics.json`` (deterministic: same inputs, same bytes), ``per_image.csv``,
``confusion_matrix.png``, ``overlays/{best,worst,random}.png`` and ``report.html``.

Thresholds follow the one rule of :func:`ptxseg.postprocess.resolve_thresholds` (shared with
predict): ``--thresholds FILE``, else ``RUN/thresholds.json``, else the default rule with a
warning; ``metrics.json`` records ``thresholds_source``. ``max_prob`` (per_image.csv, the
detection AUC) is the maximum of the probability map at MODEL resolution, before any resize,
as in predict's results.csv. ``n_train_ids`` counts the evaluated images that are in the run's
training split (``split.csv``); evaluating ``--split all`` on them warns (use ``--split val``).
Warnings are Python warnings (the CLI shows each as one yellow line).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ptxseg.config import Config
from ptxseg.data.records import Record
from ptxseg.errors import DataError, PtxsegError, RunDirError
from ptxseg.fileio import csv_text, write_json, write_text
from ptxseg.metrics import ImageStats, image_stats, summarize
from ptxseg.postprocess import (
    DEFAULT_SOURCE,
    PostParams,
    area_scale,
    binarize,
    default_rule_warning,
    resolve_thresholds,
    with_model_size,
)
from ptxseg.progress import progress_bar

AT = ("native", "model")
SPLITS = ("all", "val", "train")


# ---------------------------------------------------------------------------------------------
# run folder and data


def open_run(run: str | Path, which: str = "best") -> tuple[torch.nn.Module, Config]:
    """Load a run's model (on the GPU when present) and config; clear errors otherwise."""
    from ptxseg.inference import pick_device, prepare_model
    from ptxseg.model import load_run_model

    run = Path(run)
    if not run.is_dir():
        raise RunDirError(f"{run}: run folder not found")
    if not (run / "config.yaml").exists():
        raise RunDirError(f"{run}: not a ptxseg run folder (no config.yaml)")
    model, cfg = load_run_model(run, which)
    return prepare_model(model, pick_device("auto")), cfg


def recorded_dataset(run: Path) -> tuple[Path | None, str | None, Path | None]:
    """(root, layout, run-length CSV) of the dataset a run was trained on, as far as the run's
    ``data.json`` records them (keys ``root``/``path``, ``layout``, ``rle``; ``None`` for what
    it does not say)."""
    import json

    info = run / "data.json"
    if not info.exists():
        return None, None, None
    try:
        obj = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{info}: cannot read ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{info}: cannot read (not a JSON object)")
    root = obj.get("root") or obj.get("path") or obj.get("data")
    rle = obj.get("rle")
    return (Path(root) if root else None), obj.get("layout"), (Path(rle) if rle else None)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def run_split_records(
    run: Path,
    data: str | Path | None,
    layout: str = "auto",
    split: str = "val",
    rle: str | Path | None = None,
) -> tuple[list[Record], Path, str]:
    """Records of ``data`` (default: the run's recorded dataset), restricted to one side of the
    run's ``split.csv`` unless ``split == "all"``. Every record must have a ground truth.

    ``rle`` picks the run-length CSV of a siim folder (``--rle``); without it, the CSV the run
    recorded in ``data.json`` is used when ``data`` is the recorded dataset, else the folder's
    own (see :func:`ptxseg.data.sources.find_rle_csv`).

    Returns:
        records (sorted by id), the dataset root, the layout used.
    """
    from ptxseg.data.sources import load_records

    if split not in SPLITS:
        raise PtxsegError(f"--split: unknown '{split}' (valid: {', '.join(SPLITS)})")
    rec_root, rec_layout, rec_rle = recorded_dataset(run)
    if data is None:
        if rec_root is None:
            raise RunDirError(
                f"{run}: the run does not record its dataset; pass --data DATA"
            )
        root = rec_root
    else:
        root = Path(data)
    same = rec_root is not None and _same_path(root, rec_root)
    if same and layout == "auto" and rec_layout:
        layout = rec_layout
    if rle is None and same and rec_rle is not None and layout in ("auto", "siim"):
        rle = rec_rle
    records, used = load_records(root, layout, rle=rle)
    if split != "all":
        from ptxseg.data.split import read_split

        split_path = run / "split.csv"
        if not split_path.exists():
            raise RunDirError(f"{split_path}: missing (needed to find the {split} images)")
        assignment = read_split(split_path)
        wanted = sorted(i for i, side in assignment.items() if side == split)
        if not wanted:
            raise RunDirError(f"{split_path}: no '{split}' images")
        by_id = {r.id: r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataError(
                root,
                f"{len(missing)} of the {len(wanted)} {split} images of {split_path} are not in "
                f"this dataset (e.g. '{missing[0]}'); is it the dataset the run was trained on?",
            )
        records = [by_id[i] for i in wanted]
    no_gt = [r for r in records if r.mask is None]
    if no_gt:
        raise DataError(
            root,
            f"{len(no_gt)} of {len(records)} images have no ground-truth mask "
            f"(e.g. '{no_gt[0].id}'); evaluation needs masks",
        )
    if not records:
        raise DataError(root, "no images to evaluate")
    return records, root, used


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


def iter_predictions(
    model: torch.nn.Module,
    records: Sequence[Record],
    size: int,
    *,
    at: str = "native",
    batch_size: int = 8,
    workers: int | None = None,
    tta: str = "none",
    progress: str | None = None,
    keep_image: bool = False,
) -> Iterator[Prediction]:
    """Predict ``records`` in batches and yield each image's probabilities with its ground truth,
    at native resolution (``at="native"``) or model resolution (``at="model"``, ground truth
    resized with nearest neighbour). An unreadable image or mask raises ``DataError``.

    Args:
        progress: description of a progress bar; ``None`` shows none.
    """
    from ptxseg.data.imageio import read_mask
    from ptxseg.inference import predict_probs, probs_to_native

    if at not in AT:
        raise PtxsegError(f"--at: unknown '{at}' (valid: {', '.join(AT)})")
    entries = [(r.id, r.image) for r in records]
    with progress_bar(enabled=progress is not None, transient=True) as bar:
        task = bar.add_task(progress or "", total=len(records))
        for item, probs in predict_probs(
            model,
            entries,
            size,
            batch_size=batch_size,
            workers=workers,
            tta=tta,
            keep_image=keep_image,
        ):
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
            if at == "native":
                out = probs_to_native(probs, item.height, item.width)
            else:
                out = probs
                if gt.shape != (size, size):
                    gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_NEAREST)
            yield Prediction(record, out, gt, max_prob, item.image)
            bar.advance(task)


def count_train_ids(run: Path, records: Sequence[Record]) -> int | None:
    """How many of ``records`` are in the run's training split (``None``: no split.csv)."""
    from ptxseg.data.split import read_split

    path = run / "split.csv"
    if not path.exists():
        return None
    assignment = read_split(path)
    return sum(1 for r in records if assignment.get(r.id) == "train")


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


def per_image_csv(stats: Sequence[ImageStats]) -> str:
    """``per_image.csv``: one row per image (Dice/IoU of empty on empty = 1)."""
    return csv_text(
        PER_IMAGE_COLUMNS,
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
            ]
            for s in stats
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
    at: str = "native",
    layout: str = "auto",
    split: str = "all",
    tta: str = "none",
    batch_size: int | None = None,
    n_overlay: int = 8,
    progress: bool = False,
    rle: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run on a dataset and write every output into ``out``.

    Args:
        run: run folder (``config.yaml``, ``best.ckpt``; ``thresholds.json`` unless
            ``thresholds`` is given; ``metrics.csv`` is plotted in the report when present).
        data: dataset folder, any layout.
        out: output folder (created).
        thresholds: a thresholds file (must exist); default ``RUN/thresholds.json``, and
            without that the default rule (``probs > 0.5``, no component removal) with a
            warning (:func:`ptxseg.postprocess.resolve_thresholds`).
        at: ``native`` (default) or ``model`` resolution for the comparison.
        layout: dataset layout, ``auto`` detects.
        split: ``all`` images of ``data``, or only the run's ``val``/``train`` ids (split.csv).
        tta: ``none`` or ``hflip``.
        batch_size: prediction batch size (default: the run's).
        n_overlay: cases per overlay grid.
        progress: show a progress bar.
        rle: the run-length CSV of a siim folder (``--rle``).

    Returns:
        the content of ``metrics.json``.

    Warns:
        UserWarning: no thresholds file (the default rule is used); ``split="all"`` includes
            images of the run's training split.
    """
    from ptxseg import report
    from ptxseg.inference import check_tta

    run, out = Path(run), Path(out)
    if at not in AT:
        raise PtxsegError(f"--at: unknown '{at}' (valid: {', '.join(AT)})")
    if split not in SPLITS:
        raise PtxsegError(f"--split: unknown '{split}' (valid: {', '.join(SPLITS)})")
    check_tta(tta)
    if not run.is_dir():
        raise RunDirError(f"{run}: run folder not found")
    params, source = resolve_thresholds(run, thresholds)
    thresholds_path = None if source == DEFAULT_SOURCE else Path(source)
    model, cfg = open_run(run)
    records, root, used_layout = run_split_records(run, data, layout, split, rle)
    size = cfg.data.size
    if thresholds_path is None:
        warnings.warn(default_rule_warning(run), UserWarning, stacklevel=2)
    else:  # a file without "size": areas at model resolution
        params = with_model_size(params, size)
    n_train_ids = count_train_ids(run, records)
    if split == "all" and n_train_ids:
        warnings.warn(
            f"{n_train_ids} of the {len(records)} images have the ids of the run's training "
            f"images ({run / 'split.csv'}): if they are the same images, their metrics are "
            "optimistic; evaluate with --split val for the validation images only, or on data "
            "the run never saw",
            UserWarning,
            stacklevel=2,
        )
    predict_kw = dict(
        at=at, batch_size=batch_size or cfg.train.batch_size, workers=cfg.data.workers, tta=tta
    )

    stats: list[ImageStats] = []
    for pred in iter_predictions(
        model, records, size, progress="Evaluating" if progress else None, **predict_kw
    ):
        mask = postprocess(pred, params)
        stats.append(image_stats(pred.record.id, mask, pred.gt, pred.max_prob))

    summary = summarize(stats)
    metrics: dict[str, Any] = {
        "n_images": summary["n_images"],
        "n_positive": summary["n_positive"],
        "pooled": summary["pooled"],
        "per_image": summary["per_image"],
        "detection": summary["detection"],
        "thresholds": params.to_dict(),
        "thresholds_source": source,
        "reasons": summary["reasons"],
        "compared_at": at,
        "size": size,
        "tta": tta,
        "split": split,
        "n_train_ids": n_train_ids,
        "data": str(root),
        "layout": used_layout,
        "checkpoint": "best.ckpt",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_text(out / "per_image.csv", per_image_csv(stats))

    # overlays: the few selected cases are predicted again (cheap) instead of keeping maps
    cases = select_cases(stats, n_overlay)
    wanted = sorted({i for idx in cases.values() for i in idx})
    panels: dict[int, report.Panel] = {}
    if wanted:
        again = iter_predictions(
            model, [records[i] for i in wanted], size, keep_image=True, **predict_kw
        )
        for k, pred in zip(wanted, again, strict=True):
            panels[k] = report.make_panel(pred.image, pred.gt, postprocess(pred, params), stats[k])
    overlays = {
        name: report.Overlay(
            report.write_overlay(
                out / "overlays" / f"{name}.png", [panels[i] for i in idx], name
            ),
            [stats[i] for i in idx],
        )
        for name, idx in cases.items()
        if idx
    }
    for name, idx in cases.items():  # no stale grid from an earlier evaluation into ``out``
        if not idx:
            (out / "overlays" / f"{name}.png").unlink(missing_ok=True)
    report.write_confusion_matrix(out / "confusion_matrix.png", metrics["pooled"])
    report.write_report(
        out / "report.html",
        metrics,
        run=run,
        thresholds_path=thresholds_path,
        confusion_png=out / "confusion_matrix.png",
        curves_png=report.training_curves(run, out),
        overlays=overlays,
    )
    return metrics
