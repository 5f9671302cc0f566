"""Predict pneumothorax masks for new radiographs: ``ptxseg predict RUN INPUT... --out DIR``.

The pieces: what is read (:mod:`ptxseg.data.inputs`: files, folders, datasets -> entries with
unique file-safe ids), the model (:class:`ptxseg.predictor.Predictor`, torch or ONNX, any
device), the post-processing rule (:meth:`ptxseg.run.Run.thresholds`: ``--thresholds FILE``,
else the run's tuned one, else the default rule with a warning, recorded as
``"thresholds_source": "default"`` in ``predict.json``), the files of each image
(:mod:`ptxseg.image_outputs`), where they go (:mod:`ptxseg.outputs`: every path checked before
any work, ``--out`` locked, a previous predict's outputs replaced, never anyone else's) and the
SIIM-ACR submission (:mod:`ptxseg.kaggle`).

Outputs (all written atomically): ``masks/<id>.png``, ``overlays/<id>.png``, with
``dicom_seg`` a DICOM SEG ``dicom_seg/<id>.dcm`` per DICOM input, ``results.csv`` (one row per
input, in input order, with its lesion measures; an unreadable file is a row with its error),
``predict.json`` (what was run: the model's ``members`` and how they ``combine``), with
``kaggle_csv`` a submission (unreadable files have no row) and with ``save_probs`` the
probability maps ``probs/<id>.npy``.

The model is a run folder's, a CV folder's folds or any list of models
(:meth:`ptxseg.predictor.Predictor.from_run`); several are one ensemble whose probability is the
mean of theirs.

Probability maps (``save_probs``): what the model gave, before any resize or post-processing,
so the post-processing can be redone without the model: ``numpy.save`` files of float32 at
model resolution (``size`` x ``size``, the ``input_size`` of predict.json; an ensemble's mean).
The mask of predict is then ``binarize(probs_to_native(p, height, width), params,
area_scale=area_scale(params, height, width))`` with the image's height and width (results.csv)
and the rule of predict.json's ``thresholds`` (:mod:`ptxseg.postprocess`,
:func:`ptxseg.data.resize.probs_to_native`): exactly, bit for bit. float32 because anything
coarser (float16, an 8- or 16-bit PNG) moves pixels across a threshold and so changes masks;
model resolution because it is what the model computed (the native map is a bilinear resize
of it) and 16 to 64 times smaller than a native one: 1 MiB at 512 px, 64 KiB at 128 px.

Warnings (an unreadable file, the default rule) are Python warnings, emitted as they happen;
notes (how folders were read, what was skipped) come back in :class:`PredictSummary`; the
command line prints both.

Speed: reading/decoding runs in DataLoader workers and resizing back, binarizing and PNG
encoding in a thread pool, both overlapped with the model; only a bounded number of images is
in flight, so memory does not grow with the number of inputs.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptxseg.data.imageio import is_dicom
from ptxseg.data.inputs import Inputs, collect_inputs
from ptxseg.errors import PtxsegError, printable
from ptxseg.fileio import atomic_open
from ptxseg.image_outputs import (
    RESULTS_COLUMNS,
    ImageResult,
    Post,
    error_reason,
    finish,
    seg_algorithm,
)
from ptxseg.kaggle import KAGGLE_COLUMNS, mapped_kaggle_ids
from ptxseg.outputs import PROBS, RESULTS_NAME, OutputPlan, PredictFolder, plan_outputs
from ptxseg.overlays import OverlayStyle
from ptxseg.postprocess import PostParams
from ptxseg.predictor import Backend, Predictor, member_sources
from ptxseg.progress import progress_bar
from ptxseg.run import Run
from ptxseg.tta import Tta

if TYPE_CHECKING:
    from ptxseg.dicomseg import AlgorithmInfo


@dataclass
class Counts:
    """What one prediction's ``results.csv`` holds, counted as its rows are written."""

    images: int = 0  # rows
    predicted: int = 0  # rows with a mask (``has_pneumothorax`` not empty)
    positive: int = 0  # of those, with pneumothorax
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): status

    @property
    def unreadable(self) -> int:
        """Rows without a mask: the file could not be read (or its header was refused)."""
        return self.images - self.predicted

    @property
    def seg_failed(self) -> int:
        """Rows with a mask whose DICOM SEG could not be made (their status is an error)."""
        return len(self.errors) - self.unreadable


@dataclass
class PredictSummary:
    """The counts of ``results.csv`` (``n_images`` rows, ``n_predicted`` of them with a mask,
    ``n_positive`` of those with pneumothorax, ``errors`` the rows whose status is an error:
    ``n_unreadable`` without a mask, ``n_seg_failed`` with a mask but no DICOM SEG)."""

    out: Path
    n_images: int
    n_positive: int
    errors: list[tuple[str, str]]  # (source, reason)
    seconds: float  # the whole call, model loading included
    loop_seconds: float  # first read to last write
    backend: str
    thresholds_source: str
    notes: list[str]
    n_predicted: int = 0

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def n_unreadable(self) -> int:
        return self.n_images - self.n_predicted

    @property
    def n_seg_failed(self) -> int:
        return self.n_errors - self.n_unreadable

    @property
    def images_per_s(self) -> float:
        """Throughput of the prediction loop (model loading excluded)."""
        return self.n_images / self.loop_seconds if self.loop_seconds > 0 else 0.0


def run_prediction(
    predictor: Predictor,
    inputs: Inputs,
    out: Path,
    params: PostParams,
    *,
    kaggle_csv: Path | None = None,
    kaggle_ids: dict[str, str] | None = None,
    writers: int | None = None,
    overlays: bool = True,
    overlay_style: str | OverlayStyle = OverlayStyle.FILL,
    dicom_seg: AlgorithmInfo | None = None,
    progress: bool = True,
    console=None,
    save_probs: bool = False,
) -> tuple[Counts, float]:
    """Predict every input and write the outputs (see the module doc); each failed file (an
    unreadable one, a DICOM without its SEG) is a warning, in input order. ``dicom_seg``: write
    a DICOM SEG of each DICOM input, identifying the model so
    (:func:`ptxseg.image_outputs.seg_algorithm`).

    Returns:
        ``(counts, seconds)``: the :class:`Counts` of the rows written to results.csv, and
        the time from the first read to the last write (model loading excluded).
    """
    writers = writers or max(2, os.cpu_count() or 1)
    max_in_flight = 2 * predictor.batch_size + 2 * writers  # memory constant in len(inputs)
    post = Post(params, Path(out), overlays, kaggle_csv is not None, kaggle_ids or {},
                OverlayStyle.parse(overlay_style, "--overlay-style"), dicom_seg)
    entries = [(e.id, e.path) for e in inputs.entries]
    counts = Counts()

    with contextlib.ExitStack() as stack:
        res_fh = stack.enter_context(
            atomic_open(Path(out) / RESULTS_NAME, "w", newline="", encoding="utf-8")
        )
        kag_fh = (
            stack.enter_context(atomic_open(kaggle_csv, "w", newline="", encoding="utf-8"))
            if kaggle_csv is not None
            else None
        )
        pool = stack.enter_context(
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="ptxseg-write")
        )
        bar = stack.enter_context(progress_bar(enabled=progress, console=console, rate=True))
        results = csv.writer(res_fh, lineterminator="\n")
        results.writerow(RESULTS_COLUMNS)
        kaggle = csv.writer(kag_fh, lineterminator="\n") if kag_fh is not None else None
        if kaggle is not None:
            kaggle.writerow(KAGGLE_COLUMNS)
        task = bar.add_task("predicting", total=len(entries), rate="")
        pending: deque[Future | ImageResult] = deque()
        t0 = time.perf_counter()
        done = 0

        def emit(result: ImageResult) -> None:
            nonlocal done
            results.writerow(result.row())
            counts.images += 1
            if result.predicted:
                counts.predicted += 1
                counts.positive += int(result.has_pneumothorax)
                if kaggle is not None:
                    kaggle.writerow([result.kaggle_id, result.rle])
            if not result.ok:  # unreadable, or its DICOM SEG could not be made
                counts.errors.append((result.source, result.reason))
                warnings.warn(f"{result.source}: {result.reason}", UserWarning, stacklevel=2)
            done += 1
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f} img/s")

        def drain(block_until: int) -> None:
            while pending and (
                len(pending) > block_until
                or isinstance(pending[0], ImageResult)
                or pending[0].done()
            ):
                head = pending.popleft()
                emit(head if isinstance(head, ImageResult) else head.result())

        # the header comes with the pixels: measures and SEGs read no file again
        for item, probs in predictor.file_probs(entries, keep_image=overlays, keep_header=True):
            if probs is None:
                pending.append(ImageResult(item.id, item.path,
                                           status=f"error: {error_reason(item)}"))
            else:
                probs_dir = Path(out) / PROBS if save_probs else None
                pending.append(pool.submit(_finish, item, probs, post, probs_dir))
            drain(max_in_flight)
        drain(0)
        seconds = time.perf_counter() - t0
    return counts, seconds


def write_probs(path: Path, probs: Any) -> None:
    """One probability map as a float32 ``.npy`` file, atomically."""
    import numpy as np

    try:
        with atomic_open(path, "wb") as fh:
            np.save(fh, np.asarray(probs, np.float32), allow_pickle=False)
    except OSError as exc:
        raise PtxsegError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _finish(item, probs, post: Post, probs_dir: Path | None) -> ImageResult:
    """The image's files (:func:`ptxseg.image_outputs.finish`), its probability map first."""
    if probs_dir is not None:
        write_probs(probs_dir / f"{item.id}.npy", probs)
    return finish(item, probs, post)


def predict(
    run: str | Path,
    inputs: Inputs | Sequence[str | Path],
    out: str | Path,
    *,
    thresholds: str | Path | None = None,
    tta: str = "none",
    kaggle_csv: str | Path | None = None,
    id_maps: Sequence[str | Path] = (),
    backend: str = "torch",
    model_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    overlays: bool = True,
    overlay_style: str = "fill",
    dicom_seg: bool = False,
    device: str = "auto",
    compile: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console=None,
    save_probs: bool = False,
) -> PredictSummary:
    """Predict masks for ``inputs`` with the model of ``run`` and write them under ``out``.

    Args:
        run: a run folder (its checkpoint, its ONNX export for the onnx backend, its
            thresholds when tuned), a CV folder (its folds as one ensemble, its out-of-fold
            thresholds); with ``model_path``, any folder (its thresholds).
        inputs: image files and folders (:func:`ptxseg.data.inputs.collect_inputs`), or what
            that function returned (``exclude=[out]``).
        out: output folder (created; a previous predict's outputs in it are replaced).
        thresholds: a thresholds file to use instead of the run's.
        tta, backend, batch_size, workers, device, compile: how the model runs
            (:class:`ptxseg.predictor.Predictor`).
        kaggle_csv: also write a SIIM-ACR submission CSV here.
        id_maps: SIIM ``stage_1_*_images.csv`` files giving the submission's ImageId of each
            PNG (``new_filename`` -> ``ImageId``); needs ``kaggle_csv``.
        model_path: checkpoint (torch) or ONNX file (onnx) instead of the run's own; a
            checkpoint alone describes its model. A list (of checkpoints, ONNX files, run
            folders, CV folders): one ensemble (mean probability).
        overlays: also write overlays/<id>.png, in ``overlay_style`` (``fill``: the region
            tinted and outlined; ``outline``: outlined only).
        dicom_seg: also write a DICOM SEG ``dicom_seg/<id>.dcm`` of each DICOM input (other
            inputs: a note in results.csv).
        save_probs: also write each image's probability map, ``probs/<id>.npy`` (see the
            module doc).
        overwrite: replace existing files that no previous predict wrote (:mod:`ptxseg.outputs`).

    Returns:
        A :class:`PredictSummary`; unreadable files are in ``errors`` (the CLI exits 2).

    Raises:
        PtxsegError: missing inputs, an output path that cannot be written or would replace
            an input or someone else's file, an output folder in use by another predict,
            unusable run folder, checkpoint, model or thresholds file (before anything is
            written).
    """
    t0 = time.perf_counter()
    run, out = Run(run), Path(out)
    kaggle = Path(kaggle_csv) if kaggle_csv else None
    Tta.parse(tta, "--tta")
    backend = Backend.parse(backend, "--backend")
    overlay_style = OverlayStyle.parse(overlay_style, "--overlay-style")
    if batch_size is not None and batch_size < 1:
        raise PtxsegError(f"--batch-size: must be at least 1 (got {batch_size})")
    if id_maps and kaggle is None:
        raise PtxsegError("--id-map: gives the ImageIds of --kaggle-csv; pass --kaggle-csv too")
    collected = inputs if isinstance(inputs, Inputs) else collect_inputs(inputs, exclude=[out])
    ids = [e.id for e in collected.entries]
    kaggle_ids = mapped_kaggle_ids(collected.entries, id_maps) if id_maps else {}
    # what the command reads: never overwritten
    read_files = [e.path for e in collected.entries] + [Path(m) for m in id_maps]
    read_files += [p for p in collected.sources if p.is_file()]  # manifests
    read_files += [Path(thresholds) if thresholds else run.thresholds_path]
    sources = member_sources(run, model_path, backend)
    read_files += [path for _, path in sources]
    read_files += [r.config_path for r, _ in sources if backend is Backend.TORCH]
    folder = PredictFolder(out, overwrite=overwrite, read_files=read_files)
    plan = plan_outputs(
        folder,
        kaggle,
        read_dirs=[p for p in collected.sources if p.is_dir()],
        ids=ids,
        overlays=overlays,
        seg_ids=[e.id for e in collected.entries if is_dicom(e.path)] if dicom_seg else [],
        probs=save_probs,
    )
    with folder.hold(plan.files(ids, overlays)):
        loaded = Predictor.from_run(
            run, backend=backend, model=model_path, device=device, tta=tta,
            batch_size=batch_size, workers=workers, compile=compile,
            n_images=len(collected.entries),
        )  # fmt: skip
        return _predict_locked(
            run, loaded, collected, plan, folder, t0=t0, thresholds=thresholds,
            kaggle_ids=kaggle_ids, overlays=overlays, overlay_style=overlay_style,
            dicom_seg=dicom_seg, progress=progress, console=console, save_probs=save_probs,
        )  # fmt: skip


def _predict_locked(
    run: Run,
    predictor: Predictor,
    collected: Inputs,
    plan: OutputPlan,
    folder: PredictFolder,
    *,
    t0: float,
    thresholds,
    kaggle_ids: dict[str, str],
    overlays: bool,
    overlay_style: OverlayStyle,
    dicom_seg: bool,
    progress: bool,
    console,
    save_probs: bool = False,
) -> PredictSummary:
    """:func:`predict` once its outputs are checked, ``plan.out`` is locked and the model is
    loaded."""
    from ptxseg import __version__

    out = plan.out
    rule = run.thresholds(thresholds, predictor.size)
    ids = [e.id for e in collected.entries]
    record: dict[str, Any] = {
        "ptxseg_version": __version__,
        "run": printable(run.path),
        "backend": printable(predictor.description),
        "input_size": predictor.size,
        "tta": predictor.tta,
        "batch_size": predictor.batch_size,
        "thresholds": rule.params.to_dict(),
        "thresholds_source": printable(rule.source),
        "overlay_style": str(overlay_style),
        "dicom_seg": dicom_seg,
        **{k: printable(v) if isinstance(v, str) else [printable(m) for m in v]
           for k, v in predictor.record().items()},  # fmt: skip
    }
    if save_probs:
        record["probs"] = {
            "folder": PROBS,
            "format": "float32 .npy (numpy.save), one per image id",
            "resolution": f"model ({predictor.size} x {predictor.size}), before any resize "
            "or post-processing",
        }
    # what identifies the model in every SEG: its file's sha256, computed once per run
    algorithm = (
        seg_algorithm(run.path.name, [m.path for m in predictor.members], predictor.tta,
                      rule.params)
        if dicom_seg else None
    )  # fmt: skip
    # the folder holds this run's outputs only: the previous predict's go first, and the ids
    # are recorded before any mask is written, so an interrupted run is cleared by the next
    folder.start(plan.files(ids, overlays), {
        **record, "overlays": overlays, "kaggle_csv": plan.kaggle_name(), "ids": ids,
    })  # fmt: skip
    counts, loop_seconds = run_prediction(
        predictor,
        collected,
        out,
        rule.params,
        kaggle_csv=plan.kaggle_csv,
        kaggle_ids=kaggle_ids,
        overlays=overlays,
        overlay_style=overlay_style,
        dicom_seg=algorithm,
        progress=progress,
        console=console,
        save_probs=save_probs,
    )
    seconds = time.perf_counter() - t0
    summary = PredictSummary(
        out=out,
        n_images=counts.images,
        n_positive=counts.positive,
        errors=counts.errors,
        seconds=seconds,
        loop_seconds=loop_seconds,
        backend=predictor.description,
        thresholds_source=rule.source,
        notes=list(collected.notes),
        n_predicted=counts.predicted,
    )
    change = folder.finish({
        "images": counts.images,
        "predicted": counts.predicted,
        "positive": counts.positive,
        "errors": summary.n_errors,
        "seconds": round(seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
    })  # fmt: skip
    if change is not None:
        summary.notes.append(change)
    return summary
