"""Training: a plain ``fit(cfg, data, out)`` around the paper's LightningModule
(:mod:`ptxseg.lightning_module`).

``fit`` writes a run folder (:mod:`ptxseg.run`: the resolved config, the split, the dataset
record, best and last checkpoints, per-epoch metrics and curves), every file atomically; a new
run that fails before its first checkpoint leaves nothing behind. :func:`prepare` does all
that can fail fast (the resume check, the dataset, the split, the model, the run's first
files) and returns a :class:`Training` whose ``announcement`` says what is about to run; its
``run()`` trains. Resuming and extending: :mod:`ptxseg.resume`; the callbacks that write the
run folder: :mod:`ptxseg.callbacks`; the hardware: :mod:`ptxseg.hardware`.

Speed on a GPU: bf16 autocast (fp16 with loss scaling where bf16 is missing), channels_last,
``torch.compile`` of the model, uint8 batches from DataLoader workers (decode, resize and
augment run in the workers, pinned memory, persistent workers).

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
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from ptxseg import hardware
from ptxseg.compilation import AutotuneFullBatches, CompileStatus, Decision, planned_steps
from ptxseg.compilation import plan as compile_plan
from ptxseg.config import Config, save_config
from ptxseg.data.folds import SplitFile
from ptxseg.data.inspect import non_binary_masks
from ptxseg.data.records import Record
from ptxseg.data.split import partition
from ptxseg.fileio import write_json
from ptxseg.lightning_module import SegModule, build_module
from ptxseg.plots import read_metrics
from ptxseg.progress import log_line, plural, stderr_is_terminal
from ptxseg.resume import (
    ResumePlan,
    interrupted_message,
    load_init_weights,
    plan_resume,
    record_resume,
)
from ptxseg.run import BEST, LAST, Run
from ptxseg.tracking import LogConfig, build_loggers, recorded
from ptxseg.trainer import build_trainer, hardware_kwargs, quiet_lightning, writing


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stands and how to resume."""


# ------------------------------------------------------------------------------------------
# data loaders and the trainer


def make_loader(cfg: Config, records: Sequence[Record], *, train: bool, device: str) -> DataLoader:
    """A DataLoader of :class:`~ptxseg.data.dataset.SegDataset` (augmented when ``train``).

    Workers decode, resize and augment; batches are uint8; pinned memory on CUDA; persistent
    workers. The training loader drops an incomplete last batch and shuffles, or, with
    ``data.positive_fraction``, draws positive images at that rate
    (:class:`~ptxseg.data.sampler.PositiveFractionSampler`; under DDP Lightning wraps it in its
    distributed sampler wrapper, which shards each epoch's draw).
    """
    from ptxseg.augment import train_augmenter
    from ptxseg.data.dataset import SegDataset, worker_init
    from ptxseg.data.sampler import sampler_for

    augment = train_augmenter(cfg.augment, cfg.train.seed) if train else None
    dataset = SegDataset(records, cfg.data.size, augment)
    processes = hardware.device_count(cfg.train.devices, device)
    workers = hardware.training_workers(cfg.data.workers, processes)
    bs = cfg.train.batch_size
    sampler = sampler_for(records, cfg.data.positive_fraction, cfg.train.seed) if train else None
    return DataLoader(
        dataset,
        batch_size=bs,
        sampler=sampler,
        shuffle=train and sampler is None,
        drop_last=train and len(dataset) > bs,
        worker_init_fn=worker_init,
        **hardware.loader_kwargs(device, workers, persistent=True),
    )


def speed_callbacks(cfg: Config, module: SegModule, *, progress: bool = True) -> list:
    """The callbacks of a fast first epoch: the compile's status and eager validation
    (:class:`~ptxseg.compilation.CompileStatus`, when compiled) and cuDNN autotuning for full
    batches only (:class:`~ptxseg.compilation.AutotuneFullBatches`, with CUDA autotuning)."""
    callbacks: list = []
    plan = module.compile_plan
    if module.compiled is not None:
        callbacks.append(CompileStatus(module.compiled, plan.location, plan.key,
                                       plan.compiled_before, show=progress))  # fmt: skip
    if hardware_kwargs(cfg)["benchmark"]:
        callbacks.append(AutotuneFullBatches(cfg.train.batch_size))
    return callbacks


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


def global_rank() -> int:
    """This process's rank (0 outside distributed runs; set by torchrun/SLURM/Lightning)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


# ------------------------------------------------------------------------------------------
# the run


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


@dataclass
class Training:
    """A run ready to train (:func:`prepare`): ``announcement`` says what ``run()`` does."""

    cfg: Config
    data: Path
    run: Run
    plan: ResumePlan | None
    announcement: str = ""
    module: SegModule | None = None
    trainer: L.Trainer | None = None
    loaders: tuple[DataLoader, DataLoader] | None = None
    fresh: bool = False  # a new folder: removed again when training fails before a checkpoint
    rank: int = 0
    resume_command: str | None = None  # what an interrupted run says to type to continue

    def train(self) -> Path:
        """Train (nothing when the resumed run has finished); returns the run folder."""
        out = self.run.path
        if self.trainer is None:
            return out
        with self._failing(), _restore_sigint(), quiet_lightning():
            last = self.plan.last if self.plan is not None else None
            try:
                self.trainer.fit(self.module, *self.loaders, ckpt_path=last)
            except SystemExit:
                if self.trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1)
                    raise KeyboardInterrupt from None
                raise
        return out

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A new run that fails before its first checkpoint is removed again (nothing
        half-made); Ctrl-C becomes :class:`TrainingInterrupted`, saying where the run stands."""
        try:
            yield
        except BaseException as exc:
            out = self.run.path
            removed = self.fresh and not self.run.checkpoint("last").exists()
            if removed:
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt) and self.rank == 0:
                raise TrainingInterrupted(
                    interrupted_message(out, self.data, self.cfg.train.epochs, removed,
                                        command=self.resume_command)  # fmt: skip
                ) from None
            raise


def prepare(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    *,
    progress: bool = True,
    split: SplitFile | Mapping[str, str] | None = None,
    resume_command: str | None = None,
) -> Training:
    """Everything before the first training step: the resume check, the dataset and its
    split, the model (encoder weights or ``model.init_from``), the run's first files and the
    trainer. See :func:`fit` for the arguments.

    ``progress``: plain progress lines (each stage) where stderr is not a terminal.
    ``resume_command``: what an interrupted run says to type to continue (default: ``ptxseg
    train --data DATA --out OUT --resume``).
    """
    from ptxseg.data.folds import given_split
    from ptxseg.data.siim import rle_csv_used
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import make_split, read_split, write_split

    out, data = Path(out), Path(data)
    run = Run(out)
    rank = global_rank()
    say: Callable[[str], None] = (
        log_line if progress and rank == 0 and not stderr_is_terminal() else lambda _text: None
    )
    plan = plan_resume(cfg, out) if resume else None
    training = Training(cfg, data, run, plan, rank=rank, resume_command=resume_command)
    if plan is not None and plan.finished:
        if rank == 0:
            warnings.warn(plan.finished, UserWarning, stacklevel=2)
        return training
    restart = plan is not None and plan.last is None
    last = plan.last if plan is not None else None
    if not resume and rank == 0:
        run.check_new()
    say(f"loading data: {data} (layout {cfg.data.layout})")
    records, layout = load_records(data, cfg.data.layout, rle=cfg.data.rle)
    used_split = run.split_path if resume and (not restart or run.split_path.is_file()) else None
    if used_split is not None:
        assignment = read_split(used_split)
    elif split is not None:
        assignment = given_split(split, records)
    else:
        assignment = make_split(records, cfg.data.val_fraction, cfg.train.seed)
    train_recs, val_recs = partition(records, assignment, used_split, cfg.data.val_fraction)
    module_warns = True
    if all(r.has_pneumothorax is not None for r in val_recs) and not any(
        r.has_pneumothorax for r in val_recs
    ):
        module_warns = False
        warnings.warn(
            f"the validation split ({len(val_recs)} images) has no positive case: val IoU/Dice "
            f"only measure false positives, so {BEST} is not meaningful",
            UserWarning,
            stacklevel=2,
        )
    if rank == 0:
        _warn_non_binary(train_recs + val_recs, data)
    L.seed_everything(cfg.train.seed, workers=False, verbose=False)
    device = hardware.resolve_device(cfg.train.accelerator, "train.accelerator")
    init = None
    fine_tune = cfg.model.init_from is not None and last is None
    say(
        f"building model: {cfg.model.arch}/{cfg.model.encoder}"
        + (f", weights from {cfg.model.init_from}" if fine_tune else "")
    )
    with quiet_lightning():
        # before any file is written: a model that cannot be built (unknown encoder, weights
        # that cannot be loaded offline) leaves no half-made run folder behind
        init_state, normalization = None, plan.normalization if plan is not None else None
        if fine_tune:
            init_state, ckpt, sha, normalization = load_init_weights(cfg)
            init = {"source": str(Path(cfg.model.init_from).resolve()),
                    "checkpoint": str(ckpt.resolve()), "sha256": sha}  # fmt: skip
        processes = hardware.device_count(cfg.train.devices, device) * cfg.train.num_nodes
        steps = planned_steps(len(train_recs), cfg.train.batch_size,
                              cfg.train.epochs - (plan.done if plan else 0), processes)  # fmt: skip
        module = build_module(
            cfg, pretrained=last is None, init_state=init_state, normalization=normalization,
            compile_plan=compile_plan(cfg, device, steps),
        )
        # the experiment loggers too: a missing package is refused before any file is written
        loggers = build_loggers(cfg, out, resume=resume)
        log_config = LogConfig(cfg, resume=resume and recorded(cfg, out))
    module.warn_no_positive = module_warns
    module.restart_schedule = plan is not None and plan.extend_from is not None
    training.module = module
    training.fresh = rank == 0 and not resume and not out.exists()
    weights_report = getattr(module.model, "encoder_weights_report", None)
    with training._failing():
        if rank == 0 and (not resume or restart):
            rle = rle_csv_used(data, layout, cfg.data.rle)
            info: dict[str, Any] = {
                "root": str(data.resolve()), "layout": layout, "rle": rle and str(rle)
            }
            if init is not None:
                info["init_from"] = init
            if restart:
                warnings.warn(
                    f"{out}: no {LAST} (the run stopped before its first checkpoint): "
                    f"restarting it from scratch with its own {run.config_path.name}"
                    + (f" and {run.split_path.name}" if used_split else ""),
                    UserWarning,
                    stacklevel=2,
                )
                run.remove_stale()
            out.mkdir(parents=True, exist_ok=True)
            with writing(run.config_path):
                save_config(cfg, run.config_path)
            with writing(run.split_path):
                write_split(run.split_path, records, assignment)
            # the dataset, so `ptxseg tune RUN` finds the validation images without --data
            with writing(run.data_path):
                run.write_info(info)
            if weights_report is not None:  # a local encoder-weights file (ptxseg.weights)
                with writing(run.weights_path):
                    write_json(run.weights_path, weights_report.to_dict())
        elif rank == 0 and plan is not None:
            record_resume(cfg, run, plan)
        training.announcement = _announcement(
            cfg, device, layout, len(train_recs), len(val_recs), out, plan,
            module.compile_plan.decision,
        ) + (f"\n{weights_report.summary()}" if weights_report is not None else "")
        with _restore_sigint(), quiet_lightning():
            training.loaders = (
                make_loader(cfg, train_recs, train=True, device=device),
                make_loader(cfg, val_recs, train=False, device=device),
            )
            training.trainer = build_trainer(
                cfg, out, progress=progress, restart_patience=module.restart_schedule,
                loggers=loggers,
                callbacks=[log_config,
                           *speed_callbacks(cfg, module, progress=progress and rank == 0)],
            )
    return training


def fit(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    *,
    progress: bool = True,
    split: SplitFile | Mapping[str, str] | None = None,
) -> Path:
    """Train the model of ``cfg`` on the dataset ``data``; write the run into ``out``.

    Args:
        cfg: the resolved config (``--config`` + ``--set``).
        data: dataset folder (any layout ``ptxseg.data.sources`` reads; ``data.layout``).
        out: the run folder; must be absent or empty unless ``resume``.
        resume: continue the run in ``out`` (:mod:`ptxseg.resume`): the same ``train.epochs``
            continues on the exact LR schedule (nothing to do, with a warning, when the run has
            finished); more epochs than done extend it (a new cosine segment from ``optim.lr``
            to ``optim.lr_min``, early-stopping patience restarts, the best checkpoint stays the
            best of the whole run); a run without a last checkpoint restarts from scratch with
            its own config and split, with a warning.
        progress: a rich progress bar where stderr is a terminal, else plain lines (each
            stage, one per epoch) for logs.
        split: the train/val side of every image instead of the seeded split
            (``data.val_fraction``, ``train.seed``): a ``--split-file`` with ``id,split``
            columns (:func:`ptxseg.data.folds.read_split_file`) or a mapping id -> ``"train"``
            / ``"val"`` (a fold of a CV, :mod:`ptxseg.cv`); a resumed run keeps its own.

    Returns:
        ``out``.

    Raises:
        RunDirError: ``out`` exists without ``resume``, or cannot be resumed; WriteError: a
            run file could not be written (disk full). DataError: unusable dataset;
            TrainingError: the loss became NaN; TrainingInterrupted: Ctrl-C (the message
            says where the run stands and how to resume).
    """
    return prepare(cfg, data, out, resume, progress=progress, split=split).train()


def _announcement(
    cfg: Config,
    device: str,
    layout: str,
    n_train: int,
    n_val: int,
    out: Path,
    plan: ResumePlan | None,
    compile_decision: Decision | None = None,
) -> str:
    """One line: the data, the hardware (with the compile decision where it is not the
    CPU's plain eager default), the model and what happens to the run folder."""
    processes = hardware.device_count(cfg.train.devices, device) * cfg.train.num_nodes
    hw = f"{device} x{processes}, {hardware.lightning_precision(cfg.train.precision, device)}"
    if compile_decision is not None and (compile_decision.on or device == "cuda"):
        hw += f", {compile_decision}"
    if plan is None or plan.last is None:
        what = f"writing {out}"
    elif plan.extend_from is not None:
        what = (
            f"extending {out} from {plan.done} to {plural(cfg.train.epochs, 'epoch')} "
            f"(resuming {plan.last}; LR restarts at optim.lr={cfg.optim.lr:g})"
        )
    else:
        what = f"resuming {plan.last}"
    return (
        f"training on {n_train} images, validating on {n_val} ({layout} layout); {hw}; "
        f"{cfg.model.arch}/{cfg.model.encoder} at {cfg.data.size} px, batch "
        f"{cfg.train.batch_size}, up to {plural(cfg.train.epochs, 'epoch')}; {what}"
    )


def run_summary(run_dir: str | Path) -> str:
    """One line: epochs, time, best validation IoU/Dice and where the best checkpoint is."""
    run = Run(run_dir)
    rows = read_metrics(run.metrics_path)
    if not rows:
        return f"{run_dir}: no epoch finished"
    cfg = run.config()
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
        f"{run.checkpoint()}"
    )
