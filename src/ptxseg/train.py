"""Training: the paper's recipe as a LightningModule and a plain ``fit(cfg, data, out)``.

The run folder ``out`` receives the resolved ``config.yaml``, ``split.csv``, ``data.json``
(the dataset's path and layout, for ``ptxseg tune``), ``best.ckpt``
(best validation IoU), ``last.ckpt``, ``metrics.csv`` (one row per epoch) and ``curves.png``;
every file is written atomically. Validation IoU/Dice come from pixel counts pooled over the
whole validation set at probability 0.5 (``logit > 0``).

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
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
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

#: config keys that may change when a run is resumed (they do not change the recipe)
RESUMABLE_KEYS = frozenset(
    {
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


class TrainingError(PtxsegError):
    """Training cannot go on (the loss turned NaN/inf)."""


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
    """LR factor: cosine from 1 at step 0 to ``min_ratio`` at step ``total_steps - 1`` (the
    last optimizer step of the run), then flat. A plain object so that ``LambdaLR`` saves its
    fields in the checkpoint: a resumed run keeps the exact schedule."""

    def __init__(self, total_steps: int, min_ratio: float):
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.total_steps <= 1:
            return 1.0
        t = min(step, self.total_steps - 1) / (self.total_steps - 1)
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
        self._last_lr = cfg.optim.lr
        self._epoch_t0 = time.perf_counter()

    # -- forward / steps ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _zeros(self, n: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(n, device=self.device, dtype=dtype)

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
        with atomic_open(path, "wb") as fh:
            torch.save(checkpoint, fh)


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
            write_text(self.out / "metrics.csv", format_metrics(self.rows))
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


def _check_resume(cfg: Config, out: Path) -> Path:
    from ptxseg.model import _torch_load

    if not out.is_dir():
        raise RunDirError(f"{out}: no such run folder to resume")
    last = out / "last.ckpt"
    if not last.is_file():
        raise RunDirError(f"{out}: no last.ckpt to resume from (the run saved no epoch yet)")
    saved = _flat(load_run_config(out).to_dict())
    wanted = _flat(cfg.to_dict())
    changed = sorted(k for k in saved if saved[k] != wanted.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        k = changed[0]
        raise RunDirError(
            f"{out}: --resume with a config that differs from the run's config.yaml in "
            f"{', '.join(changed)} (e.g. {k}: {saved[k]!r} -> {wanted.get(k)!r}); resume "
            f"with the run's own config (only {', '.join(sorted(RESUMABLE_KEYS))} may change)"
        )
    _torch_load(last)  # a clear CheckpointError for a truncated/unsafe file
    return last


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
    cfg: Config, out: Path, *, progress: bool = True, callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """The Lightning Trainer of a run: precision/devices/strategy from the config, early
    stopping and checkpoints on ``val_iou``, atomic checkpoint IO, no logger folders."""
    cbs: list[Callback] = [
        *callbacks,
        EarlyStopping(monitor="val_iou", mode="max", patience=cfg.train.patience),
        RunFiles(out),
        ModelCheckpoint(
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
        ModelCheckpoint(
            dirpath=out,
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
    ]
    if progress:
        cbs.append(_ProgressBar())
    return L.Trainer(
        **hardware_kwargs(cfg),
        max_epochs=cfg.train.epochs,
        callbacks=cbs,
        logger=False,
        default_root_dir=out,
        enable_progress_bar=progress,
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


def build_module(cfg: Config, *, pretrained: bool = True) -> SegModule:
    """The module with the config's channels_last/compile settings applied."""
    accelerator = resolve_accelerator(cfg.train.accelerator)
    module = SegModule(
        cfg,
        pretrained=pretrained,
        channels_last=resolve_switch(cfg.train.channels_last, accelerator),
    )
    if device_count(cfg, accelerator) * cfg.train.num_nodes > 1:
        freeze_unused_parameters(module.model)
    if resolve_switch(cfg.train.compile, accelerator):
        module.model.compile()  # in place: state_dict keys stay model.*
    return module


def fit(
    cfg: Config, data: str | Path, out: str | Path, resume: bool = False, *, progress: bool = True
) -> Path:
    """Train the model of ``cfg`` on the dataset ``data``; write the run into ``out``.

    Args:
        cfg: the resolved config (``--config`` + ``--set``).
        data: dataset folder (any layout ``ptxseg.data.sources`` reads; ``data.layout``).
        out: the run folder; must be absent or empty unless ``resume``.
        resume: continue from ``out/last.ckpt`` (same split, same LR schedule); ``cfg`` may
            differ from the run's config only in :data:`RESUMABLE_KEYS`.
        progress: show the rich progress bar.

    Returns:
        ``out``.

    Raises:
        RunDirError: ``out`` exists without ``resume``, or cannot be resumed.
        DataError: unusable dataset; TrainingError: the loss became NaN.
    """
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import make_split, read_split, write_split

    out, data = Path(out), Path(data)
    rank = global_rank()
    last = _check_resume(cfg, out) if resume else None
    if not resume and rank == 0:
        _check_new_run(out)
    records, layout = load_records(data, cfg.data.layout)
    if resume:
        split_path = out / "split.csv"
        assignment = read_split(split_path)
    else:
        split_path = None
        assignment = make_split(records, cfg.data.val_fraction, cfg.train.seed)
    train_recs, val_recs = _partition(records, assignment, split_path, cfg.data.val_fraction)
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
    L.seed_everything(cfg.train.seed, workers=False, verbose=False)
    accelerator = resolve_accelerator(cfg.train.accelerator)
    with quiet_lightning():
        # before any file is written: a model that cannot be built (unknown encoder, weights
        # that cannot be loaded offline) leaves no half-made run folder behind
        module = build_module(cfg, pretrained=not resume)
    module.warn_no_positive = module_warns
    # a new run that fails before its first checkpoint is removed again (nothing half-made)
    fresh = rank == 0 and not resume and not out.exists()
    try:
        if rank == 0 and not resume:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            write_split(out / "split.csv", records, assignment)
            # the dataset, so `ptxseg tune RUN` finds the validation images without --data
            write_json(out / "data.json", {"root": str(data.resolve()), "layout": layout})
        if progress and rank == 0:
            _announce(cfg, accelerator, layout, len(train_recs), len(val_recs), out, last)
        with quiet_lightning():
            train_loader = make_loader(cfg, train_recs, train=True, accelerator=accelerator)
            val_loader = make_loader(cfg, val_recs, train=False, accelerator=accelerator)
            trainer = build_trainer(cfg, out, progress=progress)
            trainer.fit(module, train_loader, val_loader, ckpt_path=last)
    except BaseException:
        if fresh and not (out / "last.ckpt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _announce(
    cfg: Config, accelerator: str, layout: str, n_train: int, n_val: int, out: Path, last
) -> None:
    from rich.console import Console

    hw = (
        f"{accelerator} x{device_count(cfg, accelerator) * cfg.train.num_nodes}, "
        f"{resolve_precision(cfg.train.precision, accelerator)}"
        + (", compiled" if resolve_switch(cfg.train.compile, accelerator) else "")
    )
    what = f"resuming {last}" if last else f"writing {out}"
    Console(stderr=True).print(
        f"training on {n_train} images, validating on {n_val} ({layout} layout); {hw}; "
        f"{cfg.model.arch}/{cfg.model.encoder} at {cfg.data.size} px, batch "
        f"{cfg.train.batch_size}, up to {cfg.train.epochs} epochs; {what}",
        markup=False,
        highlight=False,
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
        f", stopped early ({cfg.train.patience} epochs without improvement)"
        if n < cfg.train.epochs
        else ""
    )
    return (
        f"{n} epoch{'s' * (n != 1)} in {minutes:.1f} min{stop}; best val IoU "
        f"{best['val_iou']:.4f} (Dice {best['val_dice']:.4f}) at epoch {best['epoch']} -> "
        f"{run_dir / 'best.ckpt'}"
    )
