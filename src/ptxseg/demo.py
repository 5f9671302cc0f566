"""``ptxseg demo``: the whole pipeline on synthetic data, on any machine.

synthesise (train pool + held-out test) -> train (configs/demo.yaml: the paper's U-Net +
EfficientNet-B4, no pretrained weights, sized for a 2-core CPU) -> tune thresholds on the
validation split -> evaluate on the held-out test -> predict a few images.

Layout of the output folder::

    OUT/data/train, OUT/data/test   synthetic datasets (png layout)
    OUT/run/                        the training run (config.yaml, best.ckpt, thresholds.json ...)
    OUT/metrics.json, report.html,  the evaluation of the held-out test (``ptxseg evaluate``)
      per_image.csv, confusion_matrix.png, overlays/
    OUT/predictions/                ``ptxseg predict`` on a few test images (+ submission.csv)
    OUT/demo.json                   what was run, with the time of each step

Each step prints its title and a one-line result (images written, the run summary, the chosen
threshold and removal area, the held-out scores, the predictions), also when the output goes
to a log file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptxseg.config import load_config
from ptxseg.errors import RunDirError
from ptxseg.fileio import write_json
from ptxseg.output_folder import OutputFolder, files_under
from ptxseg.progress import plural

MARKER = "demo.json"
DATA, RUN, PREDICTIONS = "data", "run", "predictions"


@dataclass
class DemoSize:
    """How much data the demo makes and which config overrides it applies."""

    n_train: int
    n_test: int
    image_size: int
    overrides: list[str] = field(default_factory=list)


def default_size(cuda: bool) -> DemoSize:
    """CPU: the demo config as is. GPU: more images, larger inputs, more epochs."""
    if cuda:
        return DemoSize(
            n_train=1200,
            n_test=200,
            image_size=512,
            overrides=["data.size=256", "train.batch_size=32", "train.epochs=15",
                       "data.workers=null"],
        )
    return DemoSize(n_train=300, n_test=60, image_size=256)


def older_demo(out: Path) -> set[Path] | None:
    """What a demo of an older ptxseg wrote (it left ``demo.json`` and no record): ``data/``,
    ``run/``, ``predictions/``, the evaluation's files and ``demo.json``; else ``None``."""
    from ptxseg.evaluate import OUTPUTS

    if not (out / MARKER).is_file():
        return None
    files = {out / MARKER}
    for name in (DATA, RUN, PREDICTIONS, *OUTPUTS):
        path = out / name
        files |= files_under(path) if path.is_dir() else {path} if path.is_file() else set()
    return files


def demo_folder(out: Path) -> OutputFolder:
    """The demo's ``--out`` under the one output-folder rule: new, empty, or a previous demo's
    (whose recorded files are replaced; files of others in it are kept). Anything else is
    refused: the demo never deletes what it did not write.

    Raises:
        RunDirError: ``out`` is a file, or a folder with files and no demo's record.
    """
    out = Path(out)
    folder = OutputFolder(out, "demo", legacy=older_demo)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and folder.recorded() is None:
        raise RunDirError(
            f"{out}: folder exists and is not a previous demo output (no {MARKER}); "
            "choose another --out"
        )
    folder.check([])
    return folder


def run_demo(
    out: str | Path,
    *,
    size: DemoSize | None = None,
    config: str | Path = "demo",
    overrides: Sequence[str] = (),
    progress: bool = True,
    console=None,
    on_evaluated: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` (:func:`demo_folder`); return the held-out
    evaluation (metrics.json). ``on_evaluated`` is called with it right after the evaluation
    step (the command line prints its metrics table there, before the predict step)."""
    import torch
    from rich.console import Console

    console = console or Console()
    out = Path(out)
    cuda = torch.cuda.is_available()
    size = size or default_size(cuda)
    overrides = [*size.overrides, *overrides]
    cfg = load_config(config, overrides)
    folder = demo_folder(out)
    with folder.hold():
        folder.start([])  # the previous demo's files go
        before = files_under(out)  # files of others, kept and never recorded
        status = "running"
        try:
            metrics = _run_steps(out, size, cfg, cuda, config, overrides, progress, console,
                                 on_evaluated)  # fmt: skip
            status = "done"
        finally:  # what this demo wrote, recorded also when it stops half-way
            folder.files = sorted(files_under(out) - before - {folder.lock_path})
            folder.write_record(status)
    change = folder.change()
    if change is not None:
        console.print(change, markup=False, highlight=False, soft_wrap=True)
    return metrics


def _run_steps(out, size, cfg, cuda, config, overrides, progress, console, on_evaluated):
    """The five steps of :func:`run_demo`."""
    from ptxseg.data.synthetic import generate
    from ptxseg.evaluate import METRICS_JSON, evaluate_run
    from ptxseg.predict import predict
    from ptxseg.train import fit, run_summary
    from ptxseg.tune import tune_run

    timings: dict[str, float] = {}
    record: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "n_train": size.n_train,
        "n_test": size.n_test,
        "image_size": size.image_size,
        "config": str(config),
        "overrides": overrides,
        "seconds": timings,
    }
    write_json(out / MARKER, record)

    def step(name: str, title: str):
        console.rule(f"[bold]{title}")
        return name, time.perf_counter()

    def result(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    name, t0 = step("synth", f"1/5 synthesise {size.n_train} training + {size.n_test} test images")
    train_dir, test_dir = out / DATA / "train", out / DATA / "test"
    # the held-out set gets other ids than the training images': evaluate counts the run's
    # training ids it sees
    made = [
        generate(folder, n=n, size=size.image_size, seed=seed, progress=progress, prefix=prefix)
        for folder, n, seed, prefix in (
            (train_dir, size.n_train, 0, "synth"),
            (test_dir, size.n_test, 1, "test"),
        )
    ]
    timings[name] = round(time.perf_counter() - t0, 2)
    result(
        "; ".join(
            f"{folder}: {plural(len(recs), 'image')}, "
            f"{sum(bool(r.has_pneumothorax) for r in recs)} with a lesion"
            for folder, recs in zip((train_dir, test_dir), made, strict=True)
        )
    )

    name, t0 = step(
        "train",
        f"2/5 train {cfg.model.arch} + {cfg.model.encoder} at {cfg.data.size} px, "
        f"{plural(cfg.train.epochs, 'epoch')}",
    )
    run = fit(cfg, train_dir, out / RUN, progress=progress)
    timings[name] = round(time.perf_counter() - t0, 2)
    result(run_summary(run))

    name, t0 = step("tune", "3/5 tune threshold + removal area on the validation split")
    thresholds_path, tuned = tune_run(run, progress=progress)
    timings[name] = round(time.perf_counter() - t0, 2)
    result(
        f"chosen: {tuned.params.describe()} ({tuned.objective} = {tuned.score:.4f} on the "
        f"validation split) -> {thresholds_path}"
    )

    name, t0 = step("evaluate", "4/5 evaluate on the held-out synthetic test")
    metrics = evaluate_run(run, test_dir, out, progress=progress)
    timings[name] = round(time.perf_counter() - t0, 2)
    pooled = metrics["pooled"]
    result(
        f"{plural(metrics['n_images'], 'held-out image')}: pooled Dice {pooled['f1']:.4f}, "
        f"IoU {pooled['iou']:.4f}; per-image (SIIM-ACR) Dice "
        f"{metrics['per_image']['kaggle_dice']:.4f} -> {out / METRICS_JSON}"
    )
    if on_evaluated is not None:
        on_evaluated(metrics)

    name, t0 = step("predict", "5/5 predict a few test images")
    sample = sorted((test_dir / "png_images").glob("*.png"))[:4]
    predicted = predict(
        run,
        sample,
        out / PREDICTIONS,
        kaggle_csv=out / PREDICTIONS / "submission.csv",
        progress=progress,
        console=console,
    )
    timings[name] = round(time.perf_counter() - t0, 2)
    result(
        f"{plural(predicted.n_predicted, 'image')} predicted, "
        f"{predicted.n_positive} with pneumothorax -> {out / PREDICTIONS}/"
    )
    timings["total"] = round(sum(timings.values()), 2)
    record["pooled_dice"] = metrics["pooled"]["f1"]
    record["thresholds"] = {
        "binary_threshold": tuned.params.binary_threshold,
        "removal_area": tuned.params.removal_area,
    }
    write_json(out / MARKER, record)
    return metrics
