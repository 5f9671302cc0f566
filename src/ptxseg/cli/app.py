"""The typer app, its consoles, and what every command shares: the options built from the
library's choices, and how library messages are shown (an error: one red line; a warning: one
yellow line; a note: one plain line), never a traceback.

Each choice (``--tta``, ``--layout``, ``--device`` ...) is the :class:`~ptxseg.choices.Choice`
of the module that owns it, so ``--help`` lists its values and nothing else is accepted.
Importing this module loads no torch: ``ptxseg --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from ptxseg.data.sources import Layout
from ptxseg.errors import one_line
from ptxseg.hardware import CPU_BATCH, INFERENCE_BATCH, Device
from ptxseg.predictor import Backend
from ptxseg.tta import Tta

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

# options shared by several commands
LayoutOption = Annotated[
    Layout, typer.Option("--layout", help="Dataset layout (auto: detected).")
]
TtaOption = Annotated[Tta, typer.Option("--tta", help="Test-time augmentation.")]
BatchOption = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        help=f"Images per batch (default: {INFERENCE_BATCH} GPU, {CPU_BATCH} CPU).",
    ),
]
BackendOption = Annotated[
    Backend, typer.Option("--backend", help="torch: the run's checkpoint; onnx: its export.")
]
DeviceOption = Annotated[
    Device, typer.Option("--device", help="auto: CUDA when available, else MPS, else the CPU.")
]
RleOption = Annotated[
    Path | None,
    typer.Option(
        "--rle",
        help="Run-length CSV of a siim folder holding several (implies --layout siim).",
    ),
]


#: how a trained model runs: the options of tune, evaluate and predict, declared once here
MODEL_OPTIONS = {
    "tta": (TtaOption, Tta.NONE),
    "batch_size": (BatchOption, None),
    "backend": (BackendOption, Backend.TORCH),
    "device": (DeviceOption, Device.AUTO),
}


def with_model_options(command: Callable) -> Callable:
    """Give a command the :data:`MODEL_OPTIONS` (``--tta``, ``--batch-size``, ``--backend``,
    ``--device``); it receives their values as one dict, its ``model`` parameter (the keyword
    arguments of :class:`ptxseg.predictor.Predictor`)."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for name, p in signature.parameters.items() if name != "model"] + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in MODEL_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        model = {name: kwargs.pop(name) for name in MODEL_OPTIONS}
        return command(*args, model=model, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def files_named(names: Iterable[str]) -> str:
    """``"config.yaml, best.ckpt"``: file names for a help text."""
    return ", ".join(names)


def absolute(path: Path | None) -> Path | None:
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


def print_notes(notes: Iterable[str]) -> None:
    """One plain ``note:`` line on stderr for each note a library call returned."""
    for note in notes:
        err_console.print(f"note: {one_line(note)}", highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def library_warnings():
    """Show the library's Python warnings as one yellow ``warning:`` line each (no source
    line), as they happen."""

    def show(message, category, filename, lineno, file=None, line=None):
        err_console.print(
            Text.assemble(("warning: ", "bold yellow"), one_line(str(message))), soft_wrap=True
        )

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def metrics_table(metrics: dict[str, Any]):
    """A rich table of the metrics (the report's rows), for the terminal; empty columns (no
    confidence intervals, no notes) are left out; the intervals' method is the caption."""
    from rich.table import Table

    from ptxseg.report import ci_header, ci_label, metric_table_rows, non_empty_columns

    header = ["section", "metric", "value", ci_label(metrics), "note"]
    rows = [list(r) for r in metric_table_rows(metrics)]
    keep = non_empty_columns(header, rows)
    cis = metrics.get("confidence_intervals")
    seed = cis.get("seed") if isinstance(cis, dict) else None
    table = Table(
        title=(
            f"{metrics['n_images']} images ({metrics['n_positive']} with pneumothorax), "
            f"compared at {metrics.get('compared_at', '?')} resolution"
        ),
        caption=f"{ci_header(metrics)}, seed {seed}" if 3 in keep and seed is not None else None,
    )
    for i in keep:
        table.add_column(header[i], justify="right" if i in (2, 3) else "left",
                         style="dim" if i == 4 else None)
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


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
    from ptxseg.data.imageio import max_pixels

    max_pixels()  # a bad PTXSEG_MAX_PIXELS is one error line before any work
