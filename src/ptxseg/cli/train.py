"""Training commands: ``train`` and ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptxseg.cli.app import (
    RleOption,
    absolute,
    app,
    console,
    err_console,
    library_warnings,
    metrics_table,
)
from ptxseg.data.sources import Layout
from ptxseg.errors import one_line
from ptxseg.run import LAST


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
            help=f"Continue the run in --out from {LAST}; with --set train.epochs=N (more "
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
    folds: Annotated[
        int | None,
        typer.Option(
            "--folds", min=2,
            help="Cross-validation: K patient-grouped, stratified folds; --out becomes a CV "
            "folder (cv.json, fold-0 ... fold-K-1, each a run folder).",
        ),
    ] = None,
    fold: Annotated[
        int | None,
        typer.Option(
            "--fold", min=0,
            help="Train only this fold of the CV folder --out (its cv.json is created if "
            "absent, reused if present): folds side by side on several GPUs or machines.",
        ),
    ] = None,
    split_file: Annotated[
        Path | None,
        typer.Option(
            "--split-file",
            help="CSV with id,split columns (train/val: this run's split) or id,fold columns "
            "(0..K-1: the folds of a CV folder) instead of the seeded split.",
        ),
    ] = None,
) -> None:
    """Train the U-Net (the paper's recipe by default) and write the run folder.

    Without --config the built-in 'paper' config is used; with --resume, the run's own
    config.yaml (in a CV folder, its folds'). --config NAME is a built-in (paper, demo); a
    value with a '/' or ending in .yaml/.yml is a file. Fine-tuning: --set
    model.init_from=RUN_OR_CKPT. Cross-validation: --folds K (all folds) or --fold I (one).
    Multi-node: see the README (torchrun / SLURM) and ptxseg.train.
    """
    from ptxseg.config import load_config
    from ptxseg.cv import is_cv_dir
    from ptxseg.data.folds import read_split_file
    from ptxseg.progress import log_line
    from ptxseg.run import Run
    from ptxseg.train import TrainingInterrupted, global_rank, prepare, run_summary
    from ptxseg.train_cv import cv_config, plan_training

    overrides = list(sets or [])
    if devices is not None:
        overrides.append(f"train.devices={devices}")
    if layout is not None:
        overrides.append(f"data.layout={layout}")
    split = read_split_file(split_file) if split_file is not None else None
    cross = folds is not None or fold is not None or (split is not None and split.kind == "fold")
    cross = cross or (resume and is_cv_dir(out))
    if config is not None:
        cfg = load_config(config, overrides)
    elif cross:  # the folds' own config where one has started
        cfg = cv_config(out, overrides) or load_config("paper", overrides)
    elif resume:
        run = Run(out)
        if not run.config_path.is_file():  # the run's own config: its folder must be a run
            run.check_resumable()
        cfg = load_config(run.config_path, overrides)
    else:
        cfg = load_config("paper", overrides)
    if rle is not None:  # set after parsing: a path is not a YAML value
        cfg.data.rle = str(absolute(rle))
    rank = global_rank()

    def announce(training, prefix: str = "") -> None:
        if training.announcement and rank == 0:
            log_line(prefix + training.announcement)

    def summary(run_dir: Path, prefix: str = "") -> None:
        if rank == 0:
            console.print(prefix + run_summary(run_dir), markup=False, highlight=False,
                          soft_wrap=True)  # fmt: skip

    try:
        with library_warnings():
            if not cross:
                training = prepare(cfg, data, out, resume=resume, split=split)
                announce(training)
                training.train()
                summary(out)
                return
            plan = plan_training(
                cfg, data, out, k=folds, fold=fold, split_file=split, resume=resume
            )
            for i in plan.folds:
                where = f"fold {i} of {plan.k}: "
                summary(plan.train_fold(i, announce=lambda t, w=where: announce(t, w)), where)
    except KeyboardInterrupt as exc:  # Ctrl-C: where the run stands and how to resume
        if rank == 0:
            where = str(exc) if isinstance(exc, TrainingInterrupted) else "before training began"
            err_console.print(
                Text.assemble(("interrupted: ", "bold red"), one_line(where)), soft_wrap=True
            )
        raise typer.Exit(130) from None
    if rank == 0 and all(plan.fold_run(i).checkpoint().is_file() for i in range(plan.k)):
        console.print(f"all {plan.k} folds trained; next: ptxseg tune {out}", markup=False,
                      highlight=False, soft_wrap=True)  # fmt: skip


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

    size = default_size(torch.cuda.is_available())
    size.n_train = n_train or size.n_train
    size.n_test = n_test or size.n_test
    size.image_size = image_size or size.image_size
    with library_warnings():
        metrics = run_demo(out, size=size, config=config, overrides=set_ or [], console=console,
                           on_evaluated=lambda m: console.print(metrics_table(m)))
    console.print(
        Text.assemble(
            "held-out pooled Dice ",
            (f"{metrics['pooled']['f1']:.4f}", "bold"),
            f", IoU {metrics['pooled']['iou']:.4f}; report: ",
            (str(out / "report.html"), "bold cyan"),
        )
    )
