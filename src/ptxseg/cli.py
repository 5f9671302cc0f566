"""The command line: the only module that reads argv. Each command parses its options and
calls one library function; library errors (``PtxsegError``) become one red line on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from ptxseg.data.sources import LAYOUTS
from ptxseg.errors import PtxsegError, one_line
from ptxseg.evaluate import AT, SPLITS
from ptxseg.inference import DEVICES, TTA_MODES
from ptxseg.postprocess import MODES
from ptxseg.predict import BACKENDS
from ptxseg.tune import OBJECTIVES

app = typer.Typer(
    name="ptxseg",
    help="Pneumothorax segmentation on chest X-rays (U-Net + EfficientNet-B4).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)



def _choices(name: str, values: Sequence[str]) -> type[Enum]:
    """An Enum of ``values`` for typer: ``--help`` lists them and any other value is refused.
    Each list is declared once, by the module that owns it (``TTA_MODES`` in inference.py,
    ``AT``/``SPLITS`` in evaluate.py ...); commands pass ``option.value`` on."""
    return Enum(name, [(v, v) for v in values], type=str)  # type: ignore[return-value]


Layout = _choices("Layout", ("auto", *LAYOUTS))
Tta = _choices("Tta", TTA_MODES)
At = _choices("At", AT)
Split = _choices("Split", SPLITS)
Objective = _choices("Objective", OBJECTIVES)
Mode = _choices("Mode", MODES)
Backend = _choices("Backend", BACKENDS)
Device = _choices("Device", DEVICES)

# options shared by several commands
LayoutOption = Annotated[
    Layout, typer.Option("--layout", help="Dataset layout (auto: detected).")
]
TtaOption = Annotated[Tta, typer.Option("--tta", help="Test-time augmentation.")]
RunBatchOption = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Images per batch (default: the run's).")
]
RleOption = Annotated[
    Path | None,
    typer.Option(
        "--rle",
        help="Run-length CSV of a siim folder holding several (implies --layout siim).",
    ),
]


def _abs(path: Path | None) -> Path | None:
    """A path typed on the command line, made absolute (relative to the current folder)."""
    return None if path is None else Path.cwd() / path


def fail(message: str) -> None:
    """Print one red error line and exit with code 2."""
    print_error(message)
    raise typer.Exit(2)


def print_error(message: str) -> None:
    """One red ``error:`` line on stderr; the message is printed as text (no markup, control
    characters escaped)."""
    err_console.print(Text.assemble(("error: ", "bold red"), one_line(message)), soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from ptxseg import __version__

        console.print(f"ptxseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Pneumothorax segmentation on chest X-rays (U-Net + EfficientNet-B4)."""


# --- data commands (synth, inspect) -------------------------------------------------------


@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (created; must be empty).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    size: Annotated[int, typer.Option("--size", min=32, max=4096, help="Image side.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    positive_fraction: Annotated[
        float,
        typer.Option("--positive-fraction", min=0.0, max=1.0, help="Share with a lesion."),
    ] = 0.5,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty folder.")
    ] = False,
) -> None:
    """Write a synthetic chest X-ray dataset (png layout) with pneumothorax-like lesions."""
    from ptxseg.data.synthetic import generate

    records = generate(
        out, n=n, size=size, seed=seed, positive_fraction=positive_fraction,
        overwrite=overwrite, progress=True,
    )
    positives = sum(bool(r.has_pneumothorax) for r in records)
    console.print(
        f"wrote {len(records)} images ({positives} with a pneumothorax, "
        f"{len(records) - positives} without) to {out}", markup=False, highlight=False,
    )


def _print_inspect(report) -> None:
    from rich.table import Table

    how = "detected" if report.detected else "given"
    summary = Table(title=f"{report.root}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("layout", f"{report.layout} ({how})")
    summary.add_row("images", str(report.images))
    summary.add_row("pairs (with ground truth)", str(report.pairs))
    summary.add_row("positive", str(report.positive))
    summary.add_row("negative", str(report.negative))
    if report.no_ground_truth:
        summary.add_row("no ground truth", str(report.no_ground_truth))
    for name, counts in (("image sizes", report.image_sizes), ("bit depths", report.bit_depths),
                         ("channels", report.channels), ("formats", report.formats)):
        summary.add_row(name, ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-")
    area = report.mask_area
    if area["count"]:
        summary.add_row(
            "lesion area (px)",
            f"min {area['min']}, median {area['median']:.0f}, mean {area['mean']:.0f}, "
            f"max {area['max']} (mean {100 * area['mean_fraction']:.2f}% of the image)",
        )
    console.print(summary)
    if report.problems:
        table = Table(title=f"{len(report.problems)} problem(s)", title_style="bold red",
                      title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("kind")
        table.add_column("problem", overflow="fold")
        for p in report.problems:
            table.add_row(Text(one_line(p.path)), p.kind, Text(one_line(p.problem)))
        console.print(table)
    else:
        console.print("[green]no problems found[/]")


@app.command("inspect")
def inspect_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder (or manifest CSV).")],
    layout: LayoutOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    rle: RleOption = None,
) -> None:
    """Count images, labels, sizes and lesion areas; list every problem (exit 2 if any)."""
    import json

    from ptxseg.data.inspect import inspect_dataset
    from ptxseg.progress import progress_bar

    if as_json:
        report = inspect_dataset(data, layout.value, rle=_abs(rle))
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        with progress_bar(console=err_console, transient=True) as bar:
            task = bar.add_task("inspect", total=None)
            report = inspect_dataset(
                data,
                layout.value,
                on_progress=lambda i, n: bar.update(task, completed=i, total=n),
                rle=_abs(rle),
            )
        _print_inspect(report)
    if report.problems:
        raise typer.Exit(2)

# --- training commands (train, prepare) ---------------------------------------------------


@contextlib.contextmanager
def _warnings_as_lines():
    """Show Python warnings as one yellow ``warning:`` line each (no source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        err_console.print(
            Text.assemble(("warning: ", "bold yellow"), one_line(str(message))), soft_wrap=True
        )

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder (any layout).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to create (or --resume).")],
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c",
            help="Built-in name (paper, demo) or a YAML file (a path: with a '/' or .yaml).",
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=50."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from last.ckpt; with --set train.epochs=N (more "
            "than done) extend it (a new cosine LR segment).",
        ),
    ] = False,
    devices: Annotated[
        int | None, typer.Option("--devices", min=1, help="GPUs (DDP when > 1).")
    ] = None,
    layout: Annotated[
        Layout | None, typer.Option("--layout", help="Dataset layout (default: the config's).")
    ] = None,
    rle: RleOption = None,
) -> None:
    """Train the U-Net (the paper's recipe by default) and write the run folder.

    Without --config the built-in 'paper' config is used; with --resume, the run's own
    config.yaml. --config NAME is a built-in (paper, demo); a value with a '/' or ending in
    .yaml/.yml is a file. Fine-tuning: --set model.init_from=RUN_OR_CKPT. Multi-node: see the
    README (torchrun / SLURM) and ptxseg.train.
    """
    from ptxseg.config import load_config
    from ptxseg.errors import RunDirError
    from ptxseg.train import TrainingInterrupted, fit, global_rank, run_summary

    overrides = list(sets or [])
    if devices is not None:
        overrides.append(f"train.devices={devices}")
    if layout is not None:
        overrides.append(f"data.layout={layout.value}")
    if resume and config is None:
        if not (out / "config.yaml").is_file():
            raise RunDirError(f"{out}: not a run folder to resume (no config.yaml)")
        cfg = load_config(out / "config.yaml", overrides)
    else:
        cfg = load_config(config or "paper", overrides)
    if rle is not None:  # set after parsing: a path is not a YAML value
        cfg.data.rle = str(_abs(rle))
    try:
        with _warnings_as_lines():
            fit(cfg, data, out, resume=resume)
    except KeyboardInterrupt as exc:  # Ctrl-C: where the run stands and how to resume
        if global_rank() == 0:
            where = str(exc) if isinstance(exc, TrainingInterrupted) else "before training began"
            err_console.print(
                Text.assemble(("interrupted: ", "bold red"), one_line(where)), soft_wrap=True
            )
        raise typer.Exit(130) from None
    if global_rank() == 0:
        console.print(run_summary(out), markup=False, highlight=False, soft_wrap=True)


@app.command("prepare")
def prepare_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder (any layout).")],
    out: Annotated[Path, typer.Argument(help="New folder for the resized png-layout copy.")],
    size: Annotated[int, typer.Option("--size", min=32, max=4096, help="Output side.")] = 512,
    layout: LayoutOption = "auto",
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Decoding threads (default: cores).")
    ] = None,
    rle: RleOption = None,
) -> None:
    """Write a pre-resized png-layout copy of a dataset (fast training input)."""
    from ptxseg.data.prepare import prepare

    records = prepare(
        data, out, size, layout.value, workers=workers, progress=True, rle=_abs(rle)
    )
    console.print(
        f"wrote {len(records)} image/mask pairs at {size}x{size} to {out} (+ manifest.csv "
        "with the original ids)",
        markup=False,
        highlight=False,
    )


# --- config show ----------------------------------------------------------------------------

config_app = typer.Typer(
    help="See a config: every key with its value and meaning.", no_args_is_help=True
)
app.add_typer(config_app, name="config")


def _yaml_value(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@config_app.command("show")
def config_show(
    name: Annotated[
        str,
        typer.Argument(
            help="Built-in name (paper, demo) or a YAML file (a path: with a '/' or .yaml), "
            "e.g. RUN/config.yaml."
        ),
    ] = "paper",
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key first, e.g. --set train.epochs=50."),
    ] = None,
    as_yaml: Annotated[
        bool, typer.Option("--yaml", help="Print the resolved config as YAML (a file to edit).")
    ] = False,
) -> None:
    """Print every config key with its value and description (after any --set)."""
    from ptxseg.config import describe_keys, load_config, resolve_config_path

    cfg = load_config(name, sets or [])
    if as_yaml:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    rows = [
        (
            info.key,
            _yaml_value(info.value),
            info.description
            + (f" [{' | '.join(_yaml_value(c) for c in info.choices)}]" if info.choices else ""),
        )
        for info in describe_keys(cfg)
    ]
    key_w = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    typer.echo(f"# {name}: {resolve_config_path(name)}" + (" (with --set)" if sets else ""))
    for key, value, description in rows:
        typer.echo(f"{key:<{key_w}}  {value:<{value_w}}  {description}")


# --- post-processing and evaluation commands (tune, evaluate) -----------------------------


@app.command()
def tune(
    run: Annotated[Path, typer.Argument(help="Run folder (config.yaml, best.ckpt, split.csv).")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset the run was trained on (default: the recorded one)."),
    ] = None,
    layout: LayoutOption = "auto",
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="iou: pooled-pixel IoU (the paper's); kaggle: SIIM-ACR mean per-image Dice.",
        ),
    ] = "iou",
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            help="pixel: threshold + small-component removal; triplet: top threshold, min "
            "area, bottom threshold (SIIM-ACR winners).",
        ),
    ] = "pixel",
    tta: TtaOption = "none",
    batch_size: RunBatchOption = None,
    rle: RleOption = None,
) -> None:
    """Choose the post-processing on the run's validation split; writes RUN/thresholds.json."""
    from ptxseg.tune import tune_run

    with _warnings_as_lines():
        path, result = tune_run(
            run,
            data,
            layout=layout.value,
            objective=objective.value,  # type: ignore[arg-type]
            mode=mode.value,  # type: ignore[arg-type]
            tta=tta.value,
            batch_size=batch_size,
            progress=True,
            rle=_abs(rle),
        )
    console.print(
        Text(f"{result.params.describe()}: {result.objective} = {result.score:.4f}", style="bold")
    )
    console.print(Text(f"wrote {path}"))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder (config.yaml, best.ckpt).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset to evaluate on (any layout).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    thresholds: Annotated[
        Path | None,
        typer.Option(
            "--thresholds",
            help="Thresholds file (default: RUN/thresholds.json; without it: probs > 0.5, no "
            "component removal, with a warning).",
        ),
    ] = None,
    at: Annotated[
        At,
        typer.Option(
            "--at",
            help="native: compare at each image's own resolution; model: at model resolution "
            "with the ground truth resized (the paper's).",
        ),
    ] = "native",
    layout: LayoutOption = "auto",
    split: Annotated[
        Split,
        typer.Option("--split", help="all images, or only the run's val / train ids (split.csv)."),
    ] = "all",
    tta: TtaOption = "none",
    batch_size: RunBatchOption = None,
    rle: RleOption = None,
) -> None:
    """Evaluate a run: metrics.json, per_image.csv, confusion matrix, overlays, report.html."""
    from ptxseg.evaluate import evaluate_run
    from ptxseg.report import metrics_table

    with _warnings_as_lines():
        metrics = evaluate_run(
            run,
            data,
            out,
            thresholds=thresholds,
            at=at.value,
            layout=layout.value,
            split=split.value,
            tta=tta.value,
            batch_size=batch_size,
            progress=True,
            rle=_abs(rle),
        )
    console.print(metrics_table(metrics))
    console.print(Text(f"wrote {out}/ (metrics.json, per_image.csv, report.html, ...)"))


# --- prediction and export commands (predict, export) -------------------------------------


@app.command()
def predict(
    run: Annotated[
        Path, typer.Argument(help="Run folder (config.yaml, best.ckpt, thresholds.json).")
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files (PNG, JPEG, TIFF, BMP, DICOM) and folders (searched recursively; "
            "a dataset folder gives its images).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    thresholds: Annotated[
        Path | None,
        typer.Option("--thresholds", help="Thresholds file (default: RUN/thresholds.json)."),
    ] = None,
    tta: TtaOption = "none",
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
    backend: Annotated[
        Backend, typer.Option("--backend", help="torch: RUN/best.ckpt; onnx: RUN/model.onnx.")
    ] = "torch",
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint (torch) or ONNX file (onnx) to use instead."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Images per batch (default: 32 GPU, 4 CPU)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=0, help="Image-reading processes (default: cores, <= 8)."),
    ] = None,
    overlays: Annotated[
        bool, typer.Option("--overlays/--no-overlays", help="Write overlays/<id>.png.")
    ] = True,
    device: Annotated[
        Device, typer.Option("--device", help="auto: CUDA when available, else the CPU.")
    ] = "auto",
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model (default: on CUDA for >= 1000 images).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace existing output files that ptxseg did not write."
        ),
    ] = False,
) -> None:
    """Predict masks: masks/<id>.png, overlays/<id>.png, results.csv (exit 2 if a file fails)."""
    from ptxseg.errors import printable
    from ptxseg.predict import predict as predict_fn

    summary = predict_fn(
        run,
        inputs,
        out,
        thresholds=thresholds,
        tta=tta.value,
        kaggle_csv=kaggle_csv,
        id_maps=id_maps or [],
        backend=backend.value,
        model_path=model,
        batch_size=batch_size,
        workers=workers,
        overlays=overlays,
        device=device.value,
        compile=compile,
        overwrite=overwrite,
        progress=True,
        console=err_console,
    )
    ok = summary.n_images - summary.n_errors
    console.print(
        Text(
            f"{ok} image{'s' * (ok != 1)} predicted, {summary.n_positive} with pneumothorax "
            f"({summary.images_per_s:.1f} images/s); wrote {printable(out)}/ (masks/, "
            f"{'overlays/, ' if overlays else ''}results.csv)"
            + (f" and {printable(kaggle_csv)}" if kaggle_csv else "")
        ),
        soft_wrap=True,
    )
    if summary.n_errors:
        fail(
            f"{summary.n_errors} of {summary.n_images} file{'s' * (summary.n_images != 1)} "
            f"could not be read (see the status column of {out / 'results.csv'})"
        )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (config.yaml, best.ckpt).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="ONNX file (default: RUN/model.onnx).")
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, help="Largest ONNX vs PyTorch probability gap."),
    ] = 1e-4,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing --out that is not a ptxseg export."),
    ] = False,
) -> None:
    """Export the run's model to ONNX (dynamic batch) and check parity with PyTorch."""
    from ptxseg.errors import printable
    from ptxseg.export import export_run

    result = export_run(run, out, tolerance=tolerance, overwrite=overwrite)
    console.print(
        Text(
            f"parity: max |ONNX Runtime - PyTorch| probability = {result.max_abs_diff:.2e} "
            f"(tolerance {result.tolerance:g}, fp32, batch of 3 at {result.size} px)"
        ),
        soft_wrap=True,
    )
    console.print(Text(f"wrote {printable(result.path)} ({result.bytes / 1e6:.1f} MB)"))


# --- demo ---------------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder (new, or a previous demo's).")]
    = Path("demo"),
    n_train: Annotated[
        int | None, typer.Option("--n-train", min=8, help="Synthetic training images.")
    ] = None,
    n_test: Annotated[
        int | None, typer.Option("--n-test", min=2, help="Held-out synthetic test images.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=32, help="Side of the synthetic images.")
    ] = None,
    config: Annotated[
        str,
        typer.Option(
            "--config", help="Built-in name or a YAML file (a path: with a '/' or .yaml)."
        ),
    ] = "demo",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override key=value (repeatable)."),
    ] = None,
) -> None:
    """Run the whole pipeline on synthetic data: synth, train, tune, evaluate, predict."""
    import torch

    from ptxseg.demo import default_size, run_demo
    from ptxseg.report import metrics_table

    size = default_size(torch.cuda.is_available())
    size.n_train = n_train or size.n_train
    size.n_test = n_test or size.n_test
    size.image_size = image_size or size.image_size
    with _warnings_as_lines():
        metrics = run_demo(out, size=size, config=config, overrides=set_ or [], console=console)
    console.print(metrics_table(metrics))
    console.print(
        Text.assemble(
            "held-out pooled Dice ",
            (f"{metrics['pooled']['f1']:.4f}", "bold"),
            f", IoU {metrics['pooled']['iou']:.4f}; report: ",
            (str(out / "report.html"), "bold cyan"),
        )
    )


def _choice_error(exc: typer.BadParameter) -> str | None:
    """``--at: unknown 'half' (valid: native, model)`` for a value outside an option's
    choices; None for any other bad parameter."""
    import re

    desc = getattr(exc.param, "type_descriptor", None)
    if desc is None or not desc.is_choice or not desc.choices:
        return None
    given = re.search(r"'(.*)' is not one of", exc.message)
    valid = ", ".join(str(getattr(c, "value", c)) for c in desc.choices)
    name = exc.param.opts[0] if exc.param.opts else exc.param.name
    return f"{name}: unknown {given[0].split(' is')[0] if given else 'value'} (valid: {valid})"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning library errors into one line and exit code 2 (a value
    outside an option's choices too; other usage errors print click's usage and message)."""
    try:
        code = app(args=argv, prog_name="ptxseg", standalone_mode=False)
    except typer.BadParameter as exc:
        message = _choice_error(exc)
        if message is None:
            exc.show()
            return exc.exit_code
        print_error(message)
        return 2
    except typer.TyperException as exc:  # usage errors: unknown command, missing argument...
        show = getattr(exc, "show", None)
        if show is None:
            print_error(str(exc))
            return 2
        show()
        return getattr(exc, "exit_code", 2)
    except typer.Abort:
        err_console.print("Aborted.", markup=False, highlight=False)
        return 1
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except PtxsegError as exc:
        print_error(str(exc))
        return 2
    except OSError as exc:  # disk full, permission denied, a name the OS refuses...
        where = f"{exc.filename}: " if exc.filename else ""
        print_error(f"{where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    return code if isinstance(code, int) else 0


def run() -> None:  # console script
    sys.exit(main())

