"""Training: the paper's recipe as a LightningModule and a plain ``fit(cfg, data, out)``.

The run folder ``out`` receives the resolved ``config.yaml``, ``split.csv``, ``data.json``
(the dataset's path and layout, for ``ptxseg tune``), ``weights.json`` (with a local
``model.encoder_weights`` file: its sha256 and the tensors loaded, :mod:`ptxseg.weights`),
``best.ckpt`` (best validation IoU), ``last.ckpt``, ``metrics.csv`` (one row per epoch) and
``curves.png``; every file is written atomically. Validation IoU/Dice come from pixel counts
pooled over the whole validation set at probability 0.5 (``logit > 0``).

Speed on a GPU: bf16 autocast (fp16 with loss scaling where bf16 is missing), channels_last,
``torch.compile`` of the model, uint8 batches from DataLoader workers (decode, resize and
augment run in the workers, pinned memory, persistent workers), and no host-device sync in
the training step except every ``train.log_every`` steps (progress bar, NaN check).

Multi-GPU and multi-node (DDP, through Lightning):

- one machine, N GPUs: ``ptxseg train ... --devices N`` (Lightning starts the N processes);
- several machines: start one process per GPU with the launcher and give the node count, e.g.
  ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
  -m ptxseg train ... --devices 8 --set train.num_nodes=2``; under SLURM, ``srun`` with
  ``--ntasks-per-node=8`` and the same options (Lightning reads the SLURM environment).

``train.batch_size`` is per device (the effective batch is ``batch_size x devices x
num_nodes``); the cosine schedule spans the run's real number of optimizer steps. Under DDP,
Lightning's distributed sampler pads the validation set to a multiple of the number of
processes (a few images counted twice in the pooled counts); single-device runs are exact.
Parameters the network never uses (smp's EfficientNet ``_conv_head``) are frozen for DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from ptxseg.config import Config, load_run_config, save_config
from ptxseg.data.records import Record
from ptxseg.errors import ConfigError, DataError, PtxsegError, RunDirError
from ptxseg.fileio import atomic_open, csv_text, write_json, write_text
from ptxseg.losses import BceDiceLoss
from ptxseg.metrics import dice_scores, iou_scores
from ptxseg.model import build_model
from ptxseg.plots import METRICS_COLUMNS, plot_rows, read_metrics
from ptxseg.progress import duration, log_line, plural, stderr_is_terminal

#: config keys that may change when a run is resumed (``train.epochs`` too: see :func:`fit`)
RESUMABLE_KEYS = frozenset(
    {
        "train.patience",
        "data.workers",
        "data.layout",
        "train.devices",
        "train.num_nodes",
        "train.accelerator",
        "train.precision",
        "train.compile",
        "train.channels_last",
        "train.log_every",
        "train.deterministic",
    }
)


#: masks read to check that they are binary before training (a sample: labels already read
#: every mask once, and a full second pass would double the start-up time on large sets)
MASK_SAMPLE = 64

#: what a failed write of a checkpoint looks like (torch's zip writer reports a short write,
#: e.g. on a full disk, as ``RuntimeError: ... unexpected pos N vs M``)
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class TrainingError(PtxsegError):
    """Training cannot go on (the loss turned NaN/inf)."""


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stands and how to resume."""


# ------------------------------------------------------------------------------------------
# hardware settings


def resolve_accelerator(setting: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``mps``, else ``cpu``."""
    if setting in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.accelerator: '{setting}' requested but CUDA is not available")
        return "cuda"
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return setting


def resolve_precision(setting: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU with bf16, ``16-mixed`` on older GPUs, else 32."""
    if setting == "auto":
        if accelerator == "cuda":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"
    return "32-true" if setting == "32" else setting


def resolve_switch(setting: Any, accelerator: str) -> bool:
    """``auto`` -> on with CUDA (``train.compile``, ``train.channels_last``)."""
    return accelerator == "cuda" if setting == "auto" else bool(setting)


def device_count(cfg: Config, accelerator: str) -> int:
    devices = cfg.train.devices
    if devices == "auto":
        return torch.cuda.device_count() if accelerator == "cuda" else 1
    return int(devices)


def resolve_workers(cfg: Config, accelerator: str) -> int:
    """``data.workers`` or, when null, this process's share of the CPU cores minus one (for
    the training loop itself), at most 16: decoding 1024 px PNGs takes ~25 ms per image and
    core, so a fast GPU needs every core (or a ``ptxseg prepare`` copy)."""
    if cfg.data.workers is not None:
        return cfg.data.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // max(1, device_count(cfg, accelerator))
    return max(1, min(16, share - 1))


# ------------------------------------------------------------------------------------------
# the module


class CosineToMin:
    """LR factor: cosine from 1 at step ``start`` to ``min_ratio`` at step ``start +
    total_steps - 1`` (the last optimizer step of the run, or of an extension), then flat. A
    plain object so that ``LambdaLR`` saves its fields in the checkpoint: a resumed run keeps
    the exact schedule."""

    def __init__(self, total_steps: int, min_ratio: float, start: int = 0):
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)
        self.start = int(start)

    def __call__(self, step: int) -> float:
        if self.total_steps <= 1:
            return 1.0
        t = min(max(step - self.start, 0), self.total_steps - 1) / (self.total_steps - 1)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class SegModule(L.LightningModule):
    """The paper's training step around :class:`~ptxseg.model.SegModel` (``self.model``, so
    checkpoints hold ``model.*`` weights that :func:`ptxseg.model.load_run_model` reads).

    Shape:
        - batch: ``(image, mask)``, ``(B, 1, S, S)`` uint8 each, mask in {0, 1}
    """

    def __init__(self, cfg: Config, *, pretrained: bool = True, channels_last: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, pretrained=pretrained)
        self.loss_fn = BceDiceLoss.from_config(cfg.loss)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.shown: dict[str, float] = {}  # what the progress bar displays (python floats)
        self.last_row: dict[str, float] | None = None
        self.warn_no_positive = True
        self.restart_schedule = False  # an extended run: a new cosine segment (fit)
        self._last_lr = cfg.optim.lr
        self._epoch_t0 = time.perf_counter()

    # -- forward / steps ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _zeros(self, n: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(n, device=self.device, dtype=dtype)

    def on_train_start(self) -> None:
        if self.restart_schedule:
            self._restart_schedule()

    def _restart_schedule(self) -> None:
        """Extending a run (SGDR-style warm restart): from the restored step on, the LR
        follows a new cosine from ``optim.lr`` down to ``optim.lr_min`` over the added steps;
        the first added step runs at ``optim.lr``."""
        sched = self.lr_schedulers()
        opt = self.trainer.optimizers[0]
        start = int(sched.last_epoch)  # optimizer steps done (= global_step)
        added = max(1, int(self.trainer.estimated_stepping_batches) - start)
        factor = CosineToMin(added, self.cfg.optim.lr_min / self.cfg.optim.lr, start=start)
        sched.lr_lambdas = [factor for _ in opt.param_groups]
        sched.base_lrs = [self.cfg.optim.lr for _ in opt.param_groups]
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            group["lr"] = base * factor(start)
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the epochs the LR schedule was built for: a resume with another train.epochs is an
        # extension (a new cosine segment), with the same one an exact continuation
        checkpoint["ptxseg"] = {"epochs": self.cfg.train.epochs}

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()
        self._train_acc = self._zeros(2)  # loss sum, steps
        self._nonfinite = self._zeros(1, torch.bool)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        d = loss.detach()
        self._train_acc += torch.stack([d, torch.ones_like(d)])
        self._nonfinite |= ~torch.isfinite(d)
        self._last_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        if (batch_idx + 1) % self.cfg.train.log_every == 0:
            self._check_finite(batch_idx)
            self.shown["loss"] = float(d)
        return loss

    def _check_finite(self, batch_idx: int | None = None) -> None:
        bad = bool(self._nonfinite.item())
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            where = f"epoch {self.current_epoch + 1}"
            if batch_idx is not None:
                where += f", batch {batch_idx + 1}"
            raise TrainingError(
                f"the training loss became NaN/inf ({where}); training stopped. last.ckpt and "
                "best.ckpt, where an epoch finished before, hold the last good epoch (try a "
                "lower optim.lr or train.precision=32)"
            )

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking and hasattr(self, "_nonfinite"):
            self._check_finite()  # never let a NaN model reach a checkpoint
        self._val_counts = self._zeros(3, torch.int64)  # tp, fp, fn
        self._val_acc = self._zeros(2)  # loss * images, images

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        pred = logits > 0  # probability > 0.5
        truth = y.bool()
        tp = (pred & truth).sum()
        self._val_counts += torch.stack([tp, pred.sum() - tp, truth.sum() - tp])
        self._val_acc += torch.stack([loss.detach() * x.shape[0], loss.new_tensor(x.shape[0])])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        reduce = self.trainer.strategy.reduce
        tp, fp, fn = (int(v) for v in reduce(self._val_counts, reduce_op="sum").tolist())
        val_loss_sum, n_val = reduce(self._val_acc, reduce_op="sum").tolist()
        train = getattr(self, "_train_acc", None)
        train_sum, n_train = (0.0, 0) if train is None else reduce(train, reduce_op="sum").tolist()
        iou = float(iou_scores(tp, fp, fn))
        dice = float(dice_scores(tp, fp, fn))
        if tp + fn == 0 and self.warn_no_positive:
            self.warn_no_positive = False
            warnings.warn(
                "the validation set has no positive pixel: val IoU/Dice only measure false "
                "positives (1.0 when nothing is predicted), so best.ckpt is not meaningful",
                UserWarning,
                stacklevel=1,
            )
        row = {
            "epoch": self.current_epoch + 1,
            "train_loss": train_sum / n_train if n_train else math.nan,
            "val_loss": val_loss_sum / max(n_val, 1),
            "val_iou": iou,
            "val_dice": dice,
            "lr": self._last_lr,
            "time_s": time.perf_counter() - self._epoch_t0,
        }
        self.last_row = row
        self.shown.update(loss=row["train_loss"], val_iou=iou, val_dice=dice)
        for key in ("val_iou", "val_dice", "val_loss", "train_loss"):
            self.log(key, float(row[key]), on_epoch=True, sync_dist=False)

    # -- optimizer --------------------------------------------------------------------------

    def configure_optimizers(self):
        optim = self.cfg.optim
        opt = torch.optim.Adam(
            self.model.parameters(),
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            fused=self.device.type == "cuda",
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineToMin(total, optim.lr_min / optim.lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------
# callbacks and checkpoint IO


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
def _writing(path: Path) -> Iterator[None]:
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
    """Writes ``metrics.csv`` and ``curves.png`` after each validation, before the checkpoint
    callbacks save (Lightning runs those last). The rows also live in the checkpoint, so a
    resumed run rewrites ``metrics.csv`` exactly up to the epoch it resumes from."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.rows: list[dict[str, float]] = []

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero and self.rows:
            with _writing(self.out / "metrics.csv"):
                write_text(self.out / "metrics.csv", format_metrics(self.rows))
            with _writing(self.out / "curves.png"):
                plot_rows(self.rows, self.out / "curves.png")  # the rows in hand: no re-read

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
    """``ModelCheckpoint`` for the run folder's ``best.ckpt``/``last.ckpt``. A run folder
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


class _ProgressBar(RichProgressBar):
    """Rich bar showing the module's python-side values (no device sync per step)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return {k: f"{v:.4f}" for k, v in getattr(pl_module, "shown", {}).items()}

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}/{self.trainer.max_epochs}"  # 1-based, as metrics.csv
        return f"{text:{len(self.validation_description)}}"


# ------------------------------------------------------------------------------------------
# data loaders


def make_loader(
    cfg: Config,
    records: Sequence[Record],
    *,
    train: bool,
    accelerator: str,
) -> DataLoader:
    """A DataLoader of :class:`~ptxseg.data.dataset.SegDataset` (augmented when ``train``).

    Workers decode, resize and augment; batches are uint8; pinned memory on CUDA; persistent
    workers. The training loader shuffles and drops an incomplete last batch.
    """
    from ptxseg.augment import build_train_transform
    from ptxseg.data.dataset import SegDataset, worker_init

    transform = build_train_transform(cfg.augment, cfg.train.seed) if train else None
    dataset = SegDataset(records, cfg.data.size, transform)
    workers = resolve_workers(cfg, accelerator)
    bs = cfg.train.batch_size
    return DataLoader(
        dataset,
        batch_size=bs,
        shuffle=train,
        drop_last=train and len(dataset) > bs,
        num_workers=workers,
        pin_memory=accelerator == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=worker_init,
    )


# ------------------------------------------------------------------------------------------
# the run


def global_rank() -> int:
    """This process's rank (0 outside distributed runs; set by torchrun/SLURM/Lightning)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _check_new_run(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise RunDirError(
            f"{out}: already exists and is not empty; use --resume to continue that run, "
            "or choose another --out"
        )


@dataclass
class ResumePlan:
    """What ``fit(..., resume=True)`` does with a run folder.

    Args:
        last: the checkpoint to continue from; ``None``: the run stopped before its first
            checkpoint and restarts from scratch with its own config and split.
        done: epochs finished in ``last``.
        extend_from: the ``train.epochs`` the checkpoint's LR schedule was built for, when the
            config asks for another number (an extension); ``None`` otherwise.
        finished: why there is nothing left to train (a plain resume of a finished run).
    """

    last: Path | None
    done: int = 0
    extend_from: int | None = None
    finished: str | None = None


def _early_stopping_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    states = ckpt.get("callbacks") or {}
    return next((v for k, v in states.items() if str(k).startswith("EarlyStopping")), {})


def plan_resume(cfg: Config, out: Path) -> ResumePlan:
    """Check that the run folder ``out`` can be resumed with ``cfg`` and say how.

    ``cfg`` may differ from the run's ``config.yaml`` in :data:`RESUMABLE_KEYS` and in
    ``train.epochs``: another number of epochs than the checkpoint's schedule was built for
    extends the run (it must exceed the epochs done).

    Raises:
        RunDirError: no run folder, a changed recipe, ``train.epochs`` not above the epochs
            done. CheckpointError: an unreadable ``last.ckpt``.
    """
    from ptxseg.model import _torch_load

    if not out.is_dir():
        raise RunDirError(f"{out}: no such run folder to resume")
    if not (out / "config.yaml").is_file():
        raise RunDirError(f"{out}: not a run folder to resume (no config.yaml)")
    saved_cfg = load_run_config(out)
    saved = _flat(saved_cfg.to_dict())
    wanted = _flat(cfg.to_dict())
    free = RESUMABLE_KEYS | {"train.epochs"}
    changed = sorted(k for k in saved if saved[k] != wanted.get(k) and k not in free)
    if changed:
        k = changed[0]
        raise RunDirError(
            f"{out}: --resume with a config that differs from the run's config.yaml in "
            f"{', '.join(changed)} (e.g. {k}: {saved[k]!r} -> {wanted.get(k)!r}); resume "
            f"with the run's own config (only {', '.join(sorted(free))} may change)"
        )
    last = out / "last.ckpt"
    if not last.is_file():
        return ResumePlan(last=None)
    ckpt = _torch_load(last)  # a clear CheckpointError for a truncated/unsafe file
    done = int(ckpt.get("epoch", -1)) + 1
    planned = int((ckpt.get("ptxseg") or {}).get("epochs", saved_cfg.train.epochs))
    epochs = cfg.train.epochs
    if epochs != planned:
        if epochs <= done:
            raise RunDirError(
                f"{out}: train.epochs={epochs}, but the run has already done "
                f"{plural(done, 'epoch')}; to extend it, set train.epochs above {done}"
            )
        return ResumePlan(last=last, done=done, extend_from=planned)
    more = f"to train more, extend it with --set train.epochs=N (N > {done})"
    if done >= epochs:
        return ResumePlan(
            last=last, done=done, finished=f"{out}: the run has finished its "
            f"{plural(epochs, 'epoch')}, nothing to resume; {more}"
        )
    wait = int(_early_stopping_state(ckpt).get("wait_count", 0))
    if wait >= cfg.train.patience:
        return ResumePlan(
            last=last, done=done, finished=f"{out}: the run stopped early after epoch {done} "
            f"({plural(wait, 'epoch')} without a better val IoU), nothing to resume; {more} "
            "or a larger train.patience"
        )
    return ResumePlan(last=last, done=done)


def _partition(
    records: list[Record], assignment: dict[str, str], split_path: Path | None, val_fraction: float
) -> tuple[list[Record], list[Record]]:
    ids = {r.id for r in records}
    if split_path is not None:
        gone = sorted(i for i in assignment if i not in ids)
        if gone:
            raise DataError(
                split_path,
                f"{len(gone)} image(s) of the run's split are not in the dataset (e.g. "
                f"'{gone[0]}'); resume with the dataset the run was started on",
            )
        extra = sum(1 for r in records if r.id not in assignment)
        if extra:
            warnings.warn(
                f"{extra} image(s) not in {split_path} are ignored", UserWarning, stacklevel=2
            )
    train = [r for r in records if assignment.get(r.id) == "train"]
    val = [r for r in records if assignment.get(r.id) == "val"]
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(
            None,
            f"the {side} split is empty ({len(records)} images, data.val_fraction="
            f"{val_fraction}); a run needs images on both sides",
        )
    return train, val


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
            ):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def hardware_kwargs(cfg: Config) -> dict[str, Any]:
    """Trainer arguments for the hardware: accelerator, devices, nodes, strategy, precision."""
    accelerator = resolve_accelerator(cfg.train.accelerator)
    devices = device_count(cfg, accelerator)
    nodes = cfg.train.num_nodes
    return {
        "accelerator": accelerator,
        "devices": cfg.train.devices,
        "num_nodes": nodes,
        "strategy": "ddp" if devices * nodes > 1 else "auto",
        "precision": resolve_precision(cfg.train.precision, accelerator),
        "benchmark": accelerator == "cuda" and cfg.train.deterministic is False,
        "deterministic": cfg.train.deterministic,
    }


def build_trainer(
    cfg: Config,
    out: Path,
    *,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    restart_patience: bool = False,
) -> L.Trainer:
    """The Lightning Trainer of a run: precision/devices/strategy from the config, early
    stopping and checkpoints on ``val_iou``, atomic checkpoint IO, no logger folders.

    ``progress``: the rich progress bar where stderr is a terminal, else :class:`EpochLines`.
    ``restart_patience``: an extended run (the early-stopping count starts again)."""
    bar = progress and stderr_is_terminal()
    cbs: list[Callback] = [
        *callbacks,
        RunEarlyStopping(cfg.train.patience, restart=restart_patience),
        RunFiles(out),
        RunCheckpoint(
            dirpath=out,
            filename="best",
            monitor="val_iou",
            mode="max",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        # a second callback for last.ckpt: Lightning 2.6's save_last only saves when the
        # monitored checkpoint was saved in the same step
        RunCheckpoint(
            dirpath=out,
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
    ]
    if bar:
        cbs.append(_ProgressBar())
    elif progress:
        cbs.append(EpochLines())
    return L.Trainer(
        **hardware_kwargs(cfg),
        max_epochs=cfg.train.epochs,
        callbacks=cbs,
        logger=False,
        default_root_dir=out,
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )


def freeze_unused_parameters(model: torch.nn.Module, size: int = 64) -> list[str]:
    """Set ``requires_grad=False`` on the parameters the forward pass never uses (smp's
    EfficientNet encoders keep ``_conv_head``/``_bn1``), found with one small backward pass in
    eval mode (running statistics untouched). DDP refuses parameters without gradient unless
    it searches for them at every step; frozen, they are simply not synchronised. Weights and
    checkpoint keys do not change. Returns the names frozen."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8)
        model(x).float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        for name, p in model.named_parameters():
            p.grad = None
            if name in unused:
                p.requires_grad_(False)
    finally:
        model.train(was_training)
    return unused


def build_module(
    cfg: Config,
    *,
    pretrained: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
) -> SegModule:
    """The module with the config's channels_last/compile settings applied; ``init_state``:
    weights to start from (``model.init_from``), loaded before compiling."""
    accelerator = resolve_accelerator(cfg.train.accelerator)
    module = SegModule(
        cfg,
        pretrained=pretrained and init_state is None,
        channels_last=resolve_switch(cfg.train.channels_last, accelerator),
    )
    if init_state is not None:
        module.model.load_state_dict(init_state, strict=True)
    if device_count(cfg, accelerator) * cfg.train.num_nodes > 1:
        freeze_unused_parameters(module.model)
    if resolve_switch(cfg.train.compile, accelerator):
        module.model.compile()  # in place: state_dict keys stay model.*
    return module


def non_binary_masks(
    records: Sequence[Record], limit: int = MASK_SAMPLE
) -> tuple[list[Path], int, int]:
    """Mask files (of an evenly spaced sample of at most ``limit``) with more than one
    non-zero value: the test ``ptxseg inspect`` applies to every mask. Run-length masks are
    binary by construction and not read. Returns (bad files, masks read, mask files)."""
    from ptxseg.data.imageio import read_mask_raw

    masks = [r.mask for r in records if isinstance(r.mask, Path)]
    sample = masks
    if len(masks) > limit:
        sample = [masks[i * len(masks) // limit] for i in range(limit)]
    bad = []
    for path in sample:
        try:
            raw = read_mask_raw(path)
        except DataError:
            continue  # unreadable masks are reported when they are loaded
        nonzero = raw[raw != 0]
        if nonzero.size and (nonzero != nonzero.flat[0]).any():
            bad.append(path)
    return bad, len(sample), len(masks)


def _warn_non_binary(records: Sequence[Record], data: Path) -> None:
    bad, read, total = non_binary_masks(records)
    if bad:
        of = f"all {total}" if read == total else f"a sample of {read} of the {total}"
        warnings.warn(
            f"{len(bad)} of {of} mask files are not binary (more than one non-zero value, e.g. "
            f"{bad[0]}): training takes every value > 0 as lesion; `ptxseg inspect {data}` "
            "lists every such mask",
            UserWarning,
            stacklevel=3,
        )


def _read_info(out: Path) -> dict[str, Any]:
    """The run's ``data.json`` (empty when absent or unreadable: it is rewritten)."""
    try:
        info = json.loads((out / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _config_header(info: dict[str, Any]) -> str:
    """Comment lines for config.yaml: the extensions the run went through."""
    lines = []
    for event in info.get("history", []):
        if event.get("event") == "extended":
            old, new = event["epochs"]
            at = event["at_epoch"]
            lines.append(
                f"extended at epoch {at}: train.epochs {old} -> {new}, a new cosine segment "
                f"optim.lr -> optim.lr_min over epochs {at + 1}-{new} (history in data.json)"
            )
    return "\n".join(lines)


def _remove_stale(out: Path) -> None:
    """Outputs of a start that died before its first last.ckpt (restarted from scratch)."""
    for name in ("best.ckpt", "metrics.csv", "curves.png"):
        (out / name).unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp"):  # a write killed half-way
        tmp.unlink(missing_ok=True)


def _resume_command(data: Path, out: Path) -> str:
    return f"ptxseg train --data {shlex.quote(str(data))} --out {shlex.quote(str(out))} --resume"


def _interrupted_message(out: Path, data: Path, epochs: int, removed: bool) -> str:
    """Where an interrupted run stands, and how to go on."""
    from ptxseg.model import _torch_load

    if removed:
        return (
            f"training interrupted before its first epoch finished; {out} was removed, run "
            "the same command again to start over"
        )
    last = out / "last.ckpt"
    if not last.is_file():
        return (
            f"training interrupted before its first epoch finished; continue with: "
            f"{_resume_command(data, out)} (it restarts the run from scratch)"
        )
    try:
        done = int(_torch_load(last).get("epoch", -1)) + 1
        rows = [r for r in read_metrics(out / "metrics.csv") if r["epoch"] <= done]
    except PtxsegError:
        done, rows = 0, []
    best = (
        f"; best val IoU {max(r['val_iou'] for r in rows):.4f} at epoch "
        f"{max(rows, key=lambda r: r['val_iou'])['epoch']} (best.ckpt)" if rows else ""
    )
    return (
        f"training interrupted; {out}: last finished epoch {done} of {epochs} (last.ckpt)"
        f"{best}; continue with: {_resume_command(data, out)}"
    )


@contextlib.contextmanager
def _restore_sigint() -> Iterator[None]:
    """Lightning ignores SIGINT after a Ctrl-C for its shutdown; put the handler back."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def fit(
    cfg: Config, data: str | Path, out: str | Path, resume: bool = False, *, progress: bool = True
) -> Path:
    """Train the model of ``cfg`` on the dataset ``data``; write the run into ``out``.

    Args:
        cfg: the resolved config (``--config`` + ``--set``).
        data: dataset folder (any layout ``ptxseg.data.sources`` reads; ``data.layout``).
        out: the run folder; must be absent or empty unless ``resume``.
        resume: continue the run in ``out`` (see :func:`plan_resume`). ``cfg`` may differ from
            the run's config only in :data:`RESUMABLE_KEYS` and ``train.epochs``:

            - same ``train.epochs``: continue from ``last.ckpt`` on the exact original LR
              schedule (nothing to do, with a warning, when the run has finished);
            - more epochs than done: extend the run: a new cosine segment from ``optim.lr``
              to ``optim.lr_min`` over the added epochs, early-stopping patience restarts,
              ``best.ckpt`` stays the best of the whole run, ``metrics.csv`` continues,
              ``config.yaml`` and ``data.json`` record the extension;
            - no ``last.ckpt`` yet (the run died before its first checkpoint): restart from
              scratch with the run's own config and ``split.csv``, with a warning.
        progress: a rich progress bar where stderr is a terminal, else plain lines (each
            stage, one per epoch) for logs.

    Returns:
        ``out``.

    Raises:
        RunDirError: ``out`` exists without ``resume``, or cannot be resumed; WriteError: a
            run file could not be written (disk full). DataError: unusable dataset;
            TrainingError: the loss became NaN; TrainingInterrupted: Ctrl-C (the message
            says where the run stands and how to resume).
    """
    from ptxseg.data.sources import load_records, rle_csv_used
    from ptxseg.data.split import make_split, read_split, write_split
    from ptxseg.model import load_init_weights

    out, data = Path(out), Path(data)
    rank = global_rank()
    say: Callable[[str], None] = (
        log_line if progress and rank == 0 and not stderr_is_terminal() else lambda _text: None
    )
    plan = plan_resume(cfg, out) if resume else None
    if plan is not None and plan.finished:
        if rank == 0:
            warnings.warn(plan.finished, UserWarning, stacklevel=2)
        return out
    restart = plan is not None and plan.last is None
    last = plan.last if plan is not None else None
    if not resume and rank == 0:
        _check_new_run(out)
    say(f"loading data: {data} (layout {cfg.data.layout})")
    records, layout = load_records(data, cfg.data.layout, rle=cfg.data.rle)
    split_path = out / "split.csv"
    if resume and (not restart or split_path.is_file()):
        assignment = read_split(split_path)
        used_split: Path | None = split_path
    else:
        assignment = make_split(records, cfg.data.val_fraction, cfg.train.seed)
        used_split = None
    train_recs, val_recs = _partition(records, assignment, used_split, cfg.data.val_fraction)
    module_warns = True
    if all(r.has_pneumothorax is not None for r in val_recs) and not any(
        r.has_pneumothorax for r in val_recs
    ):
        module_warns = False
        warnings.warn(
            f"the validation split ({len(val_recs)} images) has no positive case: val IoU/Dice "
            "only measure false positives, so best.ckpt is not meaningful",
            UserWarning,
            stacklevel=2,
        )
    if rank == 0:
        _warn_non_binary(train_recs + val_recs, data)
    L.seed_everything(cfg.train.seed, workers=False, verbose=False)
    accelerator = resolve_accelerator(cfg.train.accelerator)
    init = None
    fine_tune = cfg.model.init_from is not None and last is None
    say(
        f"building model: {cfg.model.arch}/{cfg.model.encoder}"
        + (f", weights from {cfg.model.init_from}" if fine_tune else "")
    )
    with quiet_lightning():
        # before any file is written: a model that cannot be built (unknown encoder, weights
        # that cannot be loaded offline) leaves no half-made run folder behind
        init_state = None
        if fine_tune:
            init_state, ckpt, sha = load_init_weights(cfg)
            init = {"source": str(Path(cfg.model.init_from).resolve()),
                    "checkpoint": str(ckpt.resolve()), "sha256": sha}
        module = build_module(cfg, pretrained=last is None, init_state=init_state)
    module.warn_no_positive = module_warns
    module.restart_schedule = plan is not None and plan.extend_from is not None
    # a new run that fails before its first checkpoint is removed again (nothing half-made)
    fresh = rank == 0 and not resume and not out.exists()
    trainer = None
    # a local encoder weights file: its sha256 and what was loaded (ptxseg.weights)
    weights_report = getattr(module.model, "encoder_weights_report", None)
    try:
        if rank == 0 and (not resume or restart):
            rle = rle_csv_used(data, layout, cfg.data.rle)
            info: dict[str, Any] = {
                "root": str(data.resolve()), "layout": layout, "rle": rle and str(rle)
            }
            if init is not None:
                info["init_from"] = init
            if restart:
                warnings.warn(
                    f"{out}: no last.ckpt (the run stopped before its first checkpoint): "
                    f"restarting it from scratch with its own config.yaml"
                    + (" and split.csv" if used_split else ""),
                    UserWarning,
                    stacklevel=2,
                )
                _remove_stale(out)
            out.mkdir(parents=True, exist_ok=True)
            with _writing(out / "config.yaml"):
                save_config(cfg, out / "config.yaml")
            with _writing(split_path):
                write_split(split_path, records, assignment)
            # the dataset, so `ptxseg tune RUN` finds the validation images without --data
            with _writing(out / "data.json"):
                write_json(out / "data.json", info)
            if weights_report is not None:
                with _writing(out / "weights.json"):
                    write_json(out / "weights.json", weights_report.to_dict())
        elif rank == 0 and plan is not None:
            _record_resume(cfg, out, plan)
        if progress and rank == 0:
            _announce(cfg, accelerator, layout, len(train_recs), len(val_recs), out, plan)
            if weights_report is not None:
                log_line(weights_report.summary())
        with _restore_sigint(), quiet_lightning():
            train_loader = make_loader(cfg, train_recs, train=True, accelerator=accelerator)
            val_loader = make_loader(cfg, val_recs, train=False, accelerator=accelerator)
            trainer = build_trainer(
                cfg, out, progress=progress, restart_patience=module.restart_schedule
            )
            try:
                trainer.fit(module, train_loader, val_loader, ckpt_path=last)
            except SystemExit:
                if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1)
                    raise KeyboardInterrupt from None
                raise
    except BaseException as exc:
        removed = fresh and not (out / "last.ckpt").exists()
        if removed:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt) and rank == 0:
            raise TrainingInterrupted(
                _interrupted_message(out, data, cfg.train.epochs, removed)
            ) from None
        raise
    return out


def _record_resume(cfg: Config, out: Path, plan: ResumePlan) -> None:
    """An extension (or a new patience) goes into config.yaml; extensions into data.json's
    ``history`` too, so the run folder says how its schedule came about."""
    info = _read_info(out)
    saved = load_run_config(out)
    if plan.extend_from is not None:
        event = {
            "event": "extended",
            "at_epoch": plan.done,
            "epochs": [plan.extend_from, cfg.train.epochs],
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        history = info.setdefault("history", [])
        if not history or {k: history[-1].get(k) for k in ("at_epoch", "epochs")} != {
            "at_epoch": event["at_epoch"], "epochs": event["epochs"]
        }:
            history.append(event)
        with _writing(out / "data.json"):
            write_json(out / "data.json", info)
    if plan.extend_from is not None or saved.train.patience != cfg.train.patience:
        recorded = saved.model_copy(deep=True)
        recorded.train.epochs = cfg.train.epochs
        recorded.train.patience = cfg.train.patience
        with _writing(out / "config.yaml"):
            save_config(recorded, out / "config.yaml", header=_config_header(info))


def _announce(
    cfg: Config,
    accelerator: str,
    layout: str,
    n_train: int,
    n_val: int,
    out: Path,
    plan: ResumePlan | None,
) -> None:
    hw = (
        f"{accelerator} x{device_count(cfg, accelerator) * cfg.train.num_nodes}, "
        f"{resolve_precision(cfg.train.precision, accelerator)}"
        + (", compiled" if resolve_switch(cfg.train.compile, accelerator) else "")
    )
    if plan is None or plan.last is None:
        what = f"writing {out}"
    elif plan.extend_from is not None:
        what = (
            f"extending {out} from {plan.done} to {plural(cfg.train.epochs, 'epoch')} "
            f"(resuming {plan.last}; LR restarts at optim.lr={cfg.optim.lr:g})"
        )
    else:
        what = f"resuming {plan.last}"
    log_line(
        f"training on {n_train} images, validating on {n_val} ({layout} layout); {hw}; "
        f"{cfg.model.arch}/{cfg.model.encoder} at {cfg.data.size} px, batch "
        f"{cfg.train.batch_size}, up to {plural(cfg.train.epochs, 'epoch')}; {what}"
    )


def run_summary(run_dir: str | Path) -> str:
    """One line: epochs, time, best validation IoU/Dice and where the best checkpoint is."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    if not rows:
        return f"{run_dir}: no epoch finished"
    cfg = load_run_config(run_dir)
    best = max(rows, key=lambda r: r["val_iou"])
    minutes = sum(r["time_s"] for r in rows) / 60
    n = rows[-1]["epoch"]
    stop = (
        f", stopped early ({plural(cfg.train.patience, 'epoch')} without improvement)"
        if n < cfg.train.epochs
        else ""
    )
    return (
        f"{plural(n, 'epoch')} in {minutes:.1f} min{stop}; best val IoU "
        f"{best['val_iou']:.4f} (Dice {best['val_dice']:.4f}) at epoch {best['epoch']} -> "
        f"{run_dir / 'best.ckpt'}"
    )
