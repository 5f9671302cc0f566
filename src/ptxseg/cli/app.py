"""The typer app, its consoles, and what every command shares: the options built from the
library's choices, and how library messages are shown (an error: one red line; a warning: one
yellow line; a note: one plain line), never a traceback.

Each choice (``--tta``, ``--layout``, ``--device`` ...) is the :class:`~ptxseg.choices.Choice`
of the module that owns it, so ``--help`` lists its values and nothing else is accepted. Every
other value is shown by a metavar (``--set KEY=VALUE``, ``--model MODEL``, ``RUN``), never by
its Python type (:class:`Command`, :data:`METAVARS`). Importing this module loads no torch:
``ptxseg --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import click
import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand

from ptxseg.data.sources import Layout
from ptxseg.errors import one_line
from ptxseg.hardware import CPU_BATCH, INFERENCE_BATCH, Device
from ptxseg.predictor import Backend
from ptxseg.tta import Tta

#: the metavar of each option or argument (by its name) that does not declare one; any other
#: gets one from its type (:data:`TYPE_METAVARS`); a choice lists its values instead
METAVARS = {
    # arguments
    "run": "RUN", "inputs": "INPUT", "name": "NAME|FILE", "data": "DATA", "out": "DIR",
    # options
    "--data": "DATA", "--out": "DIR", "--model": "MODEL", "--thresholds": "FILE",
    "--rle": "CSV", "--split-file": "CSV", "--kaggle-csv": "CSV", "--id-map": "CSV",
    "--config": "NAME|FILE", "--set": "KEY=VALUE", "--host": "HOST", "--port": "PORT",
    "--folds": "K", "--fold": "I", "--size": "PX", "--image-size": "PX", "--seed": "INT",
    "--positive-fraction": "FRACTION", "--batch-wait-ms": "MS", "--max-body-mb": "MB",
}  # fmt: skip
TYPE_METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def _metavar(param: click.Parameter) -> str | None:
    """What ``param`` shows for its value in ``--help`` (None: a flag or a choice)."""
    if getattr(param, "is_flag", False) or param.param_type_name not in ("option", "argument"):
        return None
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_choice:
        return None  # typer lists the values: <auto|png|siim>
    names = [param.name or "", *param.opts] if param.param_type_name == "argument" else param.opts
    for name in names:
        if name in METAVARS:
            return METAVARS[name]
    annotation = getattr(desc, "annotation", None)
    inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    return TYPE_METAVARS.get(inner, "VALUE")


class Command(TyperCommand):
    """A typer command whose help shows values by metavar (:func:`_metavar`) rather than by
    Python type (``<list[Path]>``), and arguments as ``RUN INPUT...`` rather than
    ``{run} {inputs}...``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None:
                param.metavar = _metavar(param)

    @staticmethod
    def _argument(param: click.Parameter) -> str:
        name = (param.metavar or param.name or "").upper()
        name += "..." if param.nargs != 1 else ""
        return name if param.required else f"[{name}]"

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [self._argument(p) for p in self.get_params(ctx)
                         if p.param_type_name == "argument"]  # fmt: skip

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((self._argument(param).strip("[]"), record[1]))
            elif param.param_type_name == "option":
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Typer(typer.Typer):
    """``typer.Typer`` whose commands are :class:`Command`."""

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable:  # fmt: skip
        return super().command(name, cls=cls or Command, **kwargs)


app = Typer(
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
