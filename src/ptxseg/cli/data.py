"""Data commands: ``synth``, ``inspect``, ``prepare`` and ``config show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptxseg.cli.app import (
    LayoutOption,
    RleOption,
    Typer,
    absolute,
    app,
    console,
    err_console,
    print_notes,
)
from ptxseg.data.sources import Layout
from ptxseg.errors import one_line
from ptxseg.run import CONFIG


@app.command("synth")
def synth_cmd(
    out: Annotated[
        Path,
        typer.Argument(help="Output folder (created; empty, or a previous synth's, replaced)."),
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    size: Annotated[int, typer.Option("--size", min=32, max=4096, help="Image side.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    positive_fraction: Annotated[
        float,
        typer.Option("--positive-fraction", min=0.0, max=1.0, help="Share with a lesion."),
    ] = 0.5,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Write into a folder that holds other files too."),
    ] = False,
) -> None:
    """Write a synthetic chest X-ray dataset (png layout) with pneumothorax-like lesions."""
    from ptxseg.data.synthetic import generate

    records = generate(
        out, n=n, size=size, seed=seed, positive_fraction=positive_fraction,
        overwrite=overwrite, progress=True, announce=lambda line: print_notes([line]),
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
    layout: LayoutOption = Layout.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    rle: RleOption = None,
) -> None:
    """Count images, labels, sizes and lesion areas (images without labels too); list every
    problem (exit 2 if any) and what else the folder holds."""
    import json

    from ptxseg.data.inspect import inspect_dataset
    from ptxseg.progress import progress_bar

    if as_json:
        report = inspect_dataset(data, layout, rle=absolute(rle))
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        with progress_bar(console=err_console, transient=True) as bar:
            task = bar.add_task("inspect", total=None)
            report = inspect_dataset(
                data,
                layout,
                on_progress=lambda i, n: bar.update(task, completed=i, total=n),
                rle=absolute(rle),
            )
        _print_inspect(report)
        print_notes(report.notes)
    if report.problems:
        raise typer.Exit(2)


@app.command("prepare")
def prepare_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset folder (any layout).")],
    out: Annotated[Path, typer.Argument(help="New folder for the resized png-layout copy.")],
    size: Annotated[int, typer.Option("--size", min=32, max=4096, help="Output side.")] = 512,
    layout: LayoutOption = Layout.AUTO,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Decoding threads (default: cores).")
    ] = None,
    rle: RleOption = None,
) -> None:
    """Write a pre-resized png-layout copy of a dataset (fast training input)."""
    from ptxseg.data.prepare import prepare

    records = prepare(
        data, out, size, layout, workers=workers, progress=True, rle=absolute(rle)
    )
    console.print(
        f"wrote {len(records)} image/mask pairs at {size}x{size} to {out} (+ manifest.csv "
        "with the original ids)",
        markup=False,
        highlight=False,
    )


config_app = Typer(
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
            f"e.g. RUN/{CONFIG}."
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
