"""The Lightning Trainer of a run (:func:`build_trainer`) and the pieces that write and watch
the run folder: atomic checkpoint IO, the epoch metrics and curves, checkpoints that survive a
moved run folder, early stopping whose patience a resume may change, and the progress shown (a
rich bar on a terminal, plain lines in logs). The hardware arguments come from
:mod:`ptxseg.hardware`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ptxseg import hardware
from ptxseg.config import Config
from ptxseg.errors import RunDirError
from ptxseg.fileio import atomic_open, csv_text, write_text
from ptxseg.plots import METRICS_COLUMNS, plot_rows
from ptxseg.progress import duration, log_line, plural, stderr_is_terminal
from ptxseg.run import BEST, LAST, Run

#: what a failed write of a checkpoint looks like (torch's zip writer reports a short write,
#: e.g. on a full disk, as ``RuntimeError: ... unexpected pos N vs M``)
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class WriteError(RunDirError):
    """A run file could not be written (disk full, quota, I/O error)."""

    def __init__(self, path: str | Path, exc: BaseException):
        path = Path(path)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
        if isinstance(exc, OSError) and exc.strerror:
            first = exc.strerror
        kept = (
            f"the previous {path.name} is kept" if path.exists() else f"no {path.name} written"
        )
        super().__init__(f"{path}: disk full / could not write ({first[:120]}); {kept}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through :func:`ptxseg.fileio.atomic_open` (temp file in
    the same folder, fsync, rename): a kill during a save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        try:
            with atomic_open(path, "wb") as fh:
                torch.save(checkpoint, fh)
        except OSError as exc:  # ENOSPC, EDQUOT, EIO ... (the temp file is removed)
            raise WriteError(path, exc) from None
        except RuntimeError as exc:
            if any(s in str(exc) for s in _WRITE_FAILURES):
                raise WriteError(path, exc) from None
            raise


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write of a run file becomes one :class:`WriteError` naming it."""
    try:
        yield
    except OSError as exc:
        raise WriteError(path, exc) from None


def format_metrics(rows: Sequence[dict[str, float]]) -> str:
    return csv_text(
        METRICS_COLUMNS,
        (
            [int(r["epoch"])]
            + [f"{r[k]:.8g}" for k in ("train_loss", "val_loss", "val_iou", "val_dice")]
            + [f"{r['lr']:.6e}", f"{r['time_s']:.2f}"]
            for r in rows
        ),
    )


class RunFiles(Callback):
    """Writes the run's epoch metrics and curves after each validation, before the checkpoint
    callbacks save (Lightning runs those last). The rows also live in the checkpoint, so a
    resumed run rewrites the metrics exactly up to the epoch it resumes from."""

    def __init__(self, run: Run):
        self.run = run
        self.rows: list[dict[str, float]] = []

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and self.rows:
            with writing(self.run.metrics_path):
                write_text(self.run.metrics_path, format_metrics(self.rows))
            with writing(self.run.curves_path):
                plot_rows(self.rows, self.run.curves_path)  # the rows in hand: no re-read

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer)  # resumed: drop rows newer than the checkpoint

    def on_validation_end(self, trainer, pl_module) -> None:
        row = getattr(pl_module, "last_row", None)
        if trainer.sanity_checking or row is None:
            return
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [dict(row)]
        self._write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


class EpochLines(Callback):
    """Progress for logs and pipes (stderr not a terminal): one plain line when training
    starts, one per epoch (epoch/total, train loss, val IoU and Dice, seconds, ETA) and one at
    the end. The ETA assumes every remaining epoch runs (early stopping may end sooner)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            first, total = trainer.current_epoch + 1, trainer.max_epochs
            what = f"epoch {first}" if first == total else f"epochs {first}-{total}"
            log_line(
                f"training {what} ({plural(trainer.num_training_batches, 'step')} per epoch, "
                "validation after each)"
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        row = getattr(pl_module, "last_row", None)
        if trainer.sanity_checking or row is None or not trainer.is_global_zero:
            return
        self.seconds.append(row["time_s"])
        left = trainer.max_epochs - int(row["epoch"])
        eta = sum(self.seconds) / len(self.seconds) * left
        log_line(
            f"epoch {row['epoch']}/{trainer.max_epochs}: train loss {row['train_loss']:.4f}, "
            f"val IoU {row['val_iou']:.4f}, Dice {row['val_dice']:.4f}, {row['time_s']:.1f} s"
            + (f", ETA {duration(eta)}" if left > 0 else "")
        )

    def on_train_end(self, trainer, pl_module) -> None:
        row = getattr(pl_module, "last_row", None)
        if trainer.is_global_zero and row is not None and row["epoch"] < trainer.max_epochs:
            log_line(
                f"stopped early after epoch {row['epoch']}: no better val IoU for "
                f"{plural(pl_module.cfg.train.patience, 'epoch')}"
            )


class RunEarlyStopping(EarlyStopping):
    """Early stopping on ``val_iou`` whose patience is always the config's (a resume may
    change ``train.patience``); ``restart`` (an extended run) also resets the count of epochs
    without improvement, while the best score of the whole run is kept."""

    def __init__(self, patience: int, *, restart: bool = False):
        super().__init__(monitor="val_iou", mode="max", patience=patience)
        self.restart = restart

    @property
    def state_key(self) -> str:  # the plain EarlyStopping's key: earlier checkpoints restore
        return super().state_key.replace(type(self).__qualname__, "EarlyStopping", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        if self.restart:
            self.wait_count = 0
            self.stopped_epoch = 0


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for the run folder's best and last checkpoints. A run folder
    may be moved or copied between a stop and ``--resume``: Lightning then drops the saved
    best score (a changed ``dirpath``) and the first resumed epoch would replace ``best.ckpt``
    whatever its IoU. The files always sit in the run folder, so their paths are moved along
    instead and the best score of the whole run is kept."""

    @property
    def state_key(self) -> str:  # the plain ModelCheckpoint's key: earlier checkpoints restore
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:

            def moved(path: Any) -> Any:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = dict(state_dict, dirpath=self.dirpath)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state_dict[key] = moved(state_dict.get(key))
            state_dict["best_k_models"] = {
                moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
            }
        super().load_state_dict(state_dict)


class ProgressBar(RichProgressBar):
    """Rich bar showing the module's python-side values (no device sync per step)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return {k: f"{v:.4f}" for k, v in getattr(pl_module, "shown", {}).items()}

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}/{self.trainer.max_epochs}"  # 1-based, as the CSV
        return f"{text:{len(self.validation_description)}}"


# ------------------------------------------------------------------------------------------
# the trainer


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (GPU available..., tips) and warnings that do not apply."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (
                ".*does not have many workers.*",
                ".*exists and is not empty.*",
                ".*sync_dist=True.*",
                ".*LeafSpec.*",
                ".*no `val_dataloader`.*",
                ".*smaller than the logging interval.*",  # the module logs once per epoch
            ):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


#: what every ptxseg Trainer leaves out: logger folders, the model summary, sanity steps
QUIET_TRAINER: dict[str, Any] = {
    "logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0
}


def hardware_kwargs(cfg: Config) -> dict[str, Any]:
    """Trainer arguments for the hardware: accelerator, devices, nodes, strategy, precision."""
    device = hardware.resolve_device(cfg.train.accelerator, "train.accelerator")
    devices = hardware.device_count(cfg.train.devices, device)
    nodes = cfg.train.num_nodes
    return {
        "accelerator": device,
        "devices": cfg.train.devices,
        "num_nodes": nodes,
        "strategy": "ddp" if devices * nodes > 1 else "auto",
        "precision": hardware.lightning_precision(cfg.train.precision, device),
        "benchmark": device == "cuda" and cfg.train.deterministic is False,
        "deterministic": cfg.train.deterministic,
    }


def build_trainer(
    cfg: Config,
    out: Path,
    *,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    restart_patience: bool = False,
    loggers: Sequence[Any] = (),
) -> L.Trainer:
    """The Lightning Trainer of a run: precision/devices/strategy from the config, early
    stopping and checkpoints on ``val_iou``, atomic checkpoint IO.

    ``progress``: the rich progress bar where stderr is a terminal, else :class:`EpochLines`.
    ``restart_patience``: an extended run (the early-stopping count starts again).
    ``loggers``: Lightning loggers (``train.logger``, :func:`ptxseg.tracking.build_loggers`);
    none: no logger folders."""
    bar = progress and stderr_is_terminal()
    run = Run(out)
    cbs: list[Callback] = [
        *callbacks,
        RunEarlyStopping(cfg.train.patience, restart=restart_patience),
        RunFiles(run),
        RunCheckpoint(
            dirpath=out,
            filename=Path(BEST).stem,
            monitor="val_iou",
            mode="max",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # a second callback for the last checkpoint: Lightning 2.6's save_last only saves
        # when the monitored checkpoint was saved in the same step
        RunCheckpoint(
            dirpath=out,
            filename=Path(LAST).stem,
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
    ]
    if bar:
        cbs.append(ProgressBar())
    elif progress:
        cbs.append(EpochLines())
    return L.Trainer(
        **hardware_kwargs(cfg),
        **{**QUIET_TRAINER, "logger": list(loggers) or False},
        max_epochs=cfg.train.epochs,
        callbacks=cbs,
        default_root_dir=out,
        enable_progress_bar=bar,
        plugins=[AtomicCheckpointIO()],
    )
