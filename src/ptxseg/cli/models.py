"""Commands that run a trained model: ``tune``, ``evaluate``, ``predict`` and ``export``.

All four load the model through :class:`ptxseg.predictor.Predictor`; the run folder's file
names in their help come from :mod:`ptxseg.run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptxseg.cli.app import (
    LayoutOption,
    RleOption,
    absolute,
    app,
    console,
    err_console,
    fail,
    files_named,
    library_warnings,
    metrics_table,
    print_notes,
    with_model_options,
)
from ptxseg.cv import MANIFEST
from ptxseg.data.sources import Layout
from ptxseg.errors import printable
from ptxseg.evaluate import OUTPUTS as EVALUATE_OUTPUTS
from ptxseg.evaluate import At
from ptxseg.hardware import COMPILE_MIN_IMAGES, MAX_INFERENCE_WORKERS
from ptxseg.onnx_runtime import DEFAULT_TOLERANCE
from ptxseg.overlays import OverlayStyle
from ptxseg.postprocess import Mode
from ptxseg.run import BEST, CONFIG, ONNX, SPLIT, THRESHOLDS, Split
from ptxseg.tune import Grid, Objective

RUN_HELP = f"Run folder ({files_named((BEST, SPLIT, THRESHOLDS))}; {CONFIG} for older runs)."
MODEL_RUN_HELP = (
    f"Run folder ({files_named((BEST, THRESHOLDS))}), or a CV folder ({MANIFEST}: its folds as "
    "one ensemble, its out-of-fold thresholds)."
)
ModelsOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--model",
        help="A checkpoint (torch; it describes its own model) or ONNX file (onnx), a run "
        "folder or a CV folder to run instead of RUN's model; repeat it for an ensemble (mean "
        "probability, all of one input size). RUN then gives the thresholds.",
    ),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace existing output files that no previous run of this command wrote.",
    ),
]
ThresholdsOption = Annotated[
    Path | None,
    typer.Option(
        "--thresholds",
        help=f"Thresholds file (default: RUN/{THRESHOLDS}; without it: probs > 0.5, no "
        "component removal, with a warning).",
    ),
]


@app.command(help=f"Choose the post-processing on the run's validation split (a CV folder: on "
                  f"the out-of-fold predictions of its folds); writes RUN/{THRESHOLDS} (a CV "
                  "folder: also its out-of-fold report, CV/out_of_fold/report.html).")  # fmt: skip
@with_model_options
def tune(
    run: Annotated[Path, typer.Argument(help=f"{RUN_HELP[:-1]}, or a CV folder ({MANIFEST}).")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset the run was trained on (default: the recorded one)."),
    ] = None,
    layout: LayoutOption = Layout.AUTO,
    rle: RleOption = None,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="iou: pooled-pixel IoU (the paper's); kaggle: SIIM-ACR mean per-image Dice.",
        ),
    ] = Objective.IOU,
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            help="pixel: threshold + small-component removal; triplet: top threshold, min "
            "area, bottom threshold (SIIM-ACR winners).",
        ),
    ] = Mode.PIXEL,
    grid: Annotated[
        Grid,
        typer.Option(
            "--grid",
            help="default: thresholds 0.01-0.95, removal areas up to 4096 px of a 512 px input; "
            "wide: thresholds 0.001-0.999, areas up to 16384 px (when the chosen rule is on "
            "the default grid's edge).",
        ),
    ] = Grid.DEFAULT,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help=f"Replace a {THRESHOLDS} that no tune wrote (a hand-written rule), and files "
            "of others in a CV folder's out_of_fold/.",
        ),
    ] = False,
    model: dict | None = None,
) -> None:
    from ptxseg.cv import is_cv_dir
    from ptxseg.tune import tune_cv, tune_run

    with library_warnings():
        path, result = (tune_cv if is_cv_dir(run) else tune_run)(
            run, data, layout=layout, rle=absolute(rle), objective=objective, mode=mode,
            progress=True, grid=grid, overwrite=overwrite,
            announce=lambda line: print_notes([line]), **model,
        )  # fmt: skip
    if result.evaluation is not None:  # a CV folder: its out-of-fold evaluation
        console.print(metrics_table(result.evaluation))
    console.print(
        Text(f"{result.params.describe()}: {result.objective} = {result.score:.4f}", style="bold")
    )
    console.print(Text(f"wrote {path}" + (f" and the out-of-fold report {result.report}"
                                          if result.report is not None else "")),
                  soft_wrap=True)  # fmt: skip


@app.command(help=f"Evaluate a run: {files_named(EVALUATE_OUTPUTS[:4])}, overlays.")
@with_model_options
def evaluate(
    run: Annotated[Path, typer.Argument(help=MODEL_RUN_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Dataset to evaluate on (any layout).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    thresholds: ThresholdsOption = None,
    at: Annotated[
        At,
        typer.Option(
            "--at",
            help="native: compare at each image's own resolution; model: at model resolution "
            "with the ground truth resized (the paper's).",
        ),
    ] = At.NATIVE,
    layout: LayoutOption = Layout.AUTO,
    rle: RleOption = None,
    split: Annotated[
        Split,
        typer.Option("--split", help=f"all images, or only the run's val / train ids ({SPLIT})."),
    ] = Split.ALL,
    models: ModelsOption = None,
    overwrite: OverwriteOption = False,
    model: dict | None = None,
) -> None:
    from ptxseg.evaluate import evaluate_run

    with library_warnings():
        metrics = evaluate_run(
            run, data, out, thresholds=thresholds, at=at, layout=layout, rle=absolute(rle),
            split=split, progress=True, models=models or [], overwrite=overwrite,
            announce=lambda line: print_notes([line]), **model,
        )  # fmt: skip
    console.print(metrics_table(metrics))
    console.print(Text(f"wrote {out}/ ({files_named(EVALUATE_OUTPUTS[:2])}, "
                       f"{EVALUATE_OUTPUTS[3]}, ...)"))  # fmt: skip


@app.command(help="Predict masks: masks/<id>.png, overlays/<id>.png, results.csv with lesion "
                  "measures, DICOM SEGs with --dicom-seg (exit 2 if a file fails).")  # fmt: skip
@with_model_options
def predict(
    run: Annotated[Path, typer.Argument(help=MODEL_RUN_HELP)],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files (PNG, JPEG, TIFF, BMP, DICOM) and folders (searched recursively; "
            "a dataset folder gives its images).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    thresholds: ThresholdsOption = None,
    kaggle_csv: Annotated[
        Path | None,
        typer.Option("--kaggle-csv", help="Also write a SIIM-ACR submission CSV here."),
    ] = None,
    id_maps: Annotated[
        list[Path] | None,
        typer.Option(
            "--id-map",
            help="SIIM stage_1_*_images.csv (new_filename,ImageId): the submission's ImageId "
            "of each PNG, by file name (repeatable: train + test).",
        ),
    ] = None,
    model_path: ModelsOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help=f"Image-reading processes (default: cores, <= {MAX_INFERENCE_WORKERS}).",
        ),
    ] = None,
    overlays: Annotated[
        bool, typer.Option("--overlays/--no-overlays", help="Write overlays/<id>.png.")
    ] = True,
    overlay_style: Annotated[
        OverlayStyle,
        typer.Option(
            "--overlay-style",
            help="fill: the predicted region tinted and outlined; outline: outlined only.",
        ),
    ] = OverlayStyle.FILL,
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg",
            help="Also write a DICOM Segmentation of each DICOM input: dicom_seg/<id>.dcm "
            "(for PACS, OHIF, 3D Slicer).",
        ),
    ] = False,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help=f"torch.compile the model (default: on CUDA for >= {COMPILE_MIN_IMAGES} "
            "images).",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOption = False,
    save_probs: Annotated[
        bool,
        typer.Option(
            "--save-probs",
            help="Also write each image's probability map: probs/<id>.npy, float32 at model "
            "resolution, before any post-processing (redo the post-processing without the "
            "model).",
        ),
    ] = False,
    model: dict | None = None,
) -> None:
    from ptxseg.image_outputs import DICOM_SEG, MASKS, OVERLAYS
    from ptxseg.outputs import RESULTS_NAME
    from ptxseg.predict import predict as predict_fn

    with library_warnings():
        summary = predict_fn(
            run, inputs, out, thresholds=thresholds, kaggle_csv=kaggle_csv,
            id_maps=id_maps or [], model_path=model_path or None, workers=workers,
            overlays=overlays, overlay_style=overlay_style, dicom_seg=dicom_seg,
            compile=compile, overwrite=overwrite, progress=True, console=err_console,
            save_probs=save_probs, **model,
        )  # fmt: skip
    print_notes(summary.notes)
    n = summary.n_predicted  # rows of results.csv with a mask
    console.print(
        Text(
            f"{n} image{'s' * (n != 1)} predicted, {summary.n_positive} with pneumothorax "
            f"({summary.images_per_s:.1f} images/s); wrote {printable(out)}/ ({MASKS}/, "
            f"{f'{OVERLAYS}/, ' if overlays else ''}{f'{DICOM_SEG}/, ' if dicom_seg else ''}"
            f"{RESULTS_NAME})"
            + (f" and {printable(kaggle_csv)}" if kaggle_csv else "")
        ),
        soft_wrap=True,
    )
    if summary.n_errors:
        why = [f"{summary.n_unreadable} not predicted (unreadable)" if summary.n_unreadable
               else "", f"{summary.n_seg_failed} predicted without a DICOM SEG"
               if summary.n_seg_failed else ""]  # fmt: skip
        fail(
            f"{summary.n_errors} of {summary.n_images} file{'s' * (summary.n_images != 1)} "
            f"failed: {', '.join(w for w in why if w)}; see the status column of "
            f"{out / RESULTS_NAME}"
        )


@app.command(help="Export the run's model to ONNX (dynamic batch) and check parity with "
                  "PyTorch.")  # fmt: skip
def export(
    run: Annotated[Path, typer.Argument(help=f"Run folder ({BEST}).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help=f"ONNX file (default: RUN/{ONNX})."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, help="Largest ONNX vs PyTorch probability gap."),
    ] = DEFAULT_TOLERANCE,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing --out that is not a ptxseg export."),
    ] = False,
) -> None:
    from ptxseg.export import export_run

    with library_warnings():
        result = export_run(run, out, tolerance=tolerance, overwrite=overwrite)
    console.print(
        Text(
            f"parity: max |ONNX Runtime - PyTorch| probability = {result.max_abs_diff:.2e} "
            f"(tolerance {result.tolerance:g}, fp32, batch of 3 at {result.size} px)"
        ),
        soft_wrap=True,
    )
    console.print(Text(f"wrote {printable(result.path)} ({result.bytes / 1e6:.1f} MB)"))

