"""Continuing a run: what ``--resume`` may change, how a run continues or is extended, what
the run folder records of it, where an interrupted run stands, and fine-tuning from another
run's weights (``model.init_from``).

A resumed run continues from its last checkpoint with its own config; only
:data:`RESUMABLE_KEYS` and ``train.epochs`` may differ. The same ``train.epochs`` continues on
the exact LR schedule; more epochs extend the run (a new cosine segment, recorded in the run's
config header and its dataset record's ``history``); a run that stopped before its first
checkpoint restarts from scratch with its own config and split.
"""

from __future__ import annotations

import datetime
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptxseg.checkpoint import embedded_info, load_checkpoint, read_checkpoint
from ptxseg.config import Config, save_config
from ptxseg.errors import CheckpointError, ConfigError, PtxsegError, RunDirError
from ptxseg.fileio import sha256_file
from ptxseg.normalization import IMAGENET, Normalization
from ptxseg.plots import read_metrics
from ptxseg.progress import plural
from ptxseg.run import BEST, CONFIG, DATA, LAST, Run
from ptxseg.trainer import writing

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
        "train.compile_cache",
        "train.channels_last",
        "train.log_every",
        "train.deterministic",
        "train.logger",
    }
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


#: what may differ between a run's config and its resume (or between the folds of a CV)
FREE_KEYS = RESUMABLE_KEYS | {"train.epochs"}


def recipe_changes(saved: Config, wanted: Config) -> str:
    """The recipe keys (all but :data:`FREE_KEYS`) on which ``wanted`` differs from
    ``saved``, as ``"k1, k2 (e.g. k1: old -> new)"``; empty when none does."""
    before, after = _flat(saved.to_dict()), _flat(wanted.to_dict())
    changed = sorted(k for k in before if before[k] != after.get(k) and k not in FREE_KEYS)
    if not changed:
        return ""
    k = changed[0]
    return f"{', '.join(changed)} (e.g. {k}: {before[k]!r} -> {after.get(k)!r})"


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
        normalization: the mean/std the run's model trained with (``None``: a restart takes
            the config's).
    """

    last: Path | None
    done: int = 0
    extend_from: int | None = None
    finished: str | None = None
    normalization: Normalization | None = None


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
    run = Run(out)
    run.check_resumable()
    saved_cfg = run.config()
    changed = recipe_changes(saved_cfg, cfg)
    if changed:
        raise RunDirError(
            f"{out}: --resume with a config that differs from the run's {CONFIG} in "
            f"{changed}; resume with the run's own config (only "
            f"{', '.join(sorted(FREE_KEYS))} may change)"
        )
    last = run.checkpoint("last")
    if not last.is_file():
        return ResumePlan(last=None)
    ckpt = read_checkpoint(last)  # a clear CheckpointError for a truncated/unsafe file
    info = embedded_info(ckpt, last)  # older checkpoints: ImageNet, what every model used
    norm = info.normalization if info is not None else IMAGENET
    done = int(ckpt.get("epoch", -1)) + 1
    planned = int((ckpt.get("ptxseg") or {}).get("epochs", saved_cfg.train.epochs))
    epochs = cfg.train.epochs
    if epochs != planned:
        if epochs <= done:
            raise RunDirError(
                f"{out}: train.epochs={epochs}, but the run has already done "
                f"{plural(done, 'epoch')}; to extend it, set train.epochs above {done}"
            )
        return ResumePlan(last=last, done=done, extend_from=planned, normalization=norm)
    more = f"to train more, extend it with --set train.epochs=N (N > {done})"
    if done >= epochs:
        return ResumePlan(
            last=last, done=done, normalization=norm, finished=f"{out}: the run has finished its "
            f"{plural(epochs, 'epoch')}, nothing to resume; {more}"
        )
    wait = int(_early_stopping_state(ckpt).get("wait_count", 0))
    if wait >= cfg.train.patience:
        return ResumePlan(
            last=last, done=done, normalization=norm,
            finished=f"{out}: the run stopped early after epoch {done} "
            f"({plural(wait, 'epoch')} without a better val IoU), nothing to resume; {more} "
            "or a larger train.patience"
        )
    return ResumePlan(last=last, done=done, normalization=norm)


def record_resume(cfg: Config, run: Run, plan: ResumePlan) -> None:
    """An extension (or a new patience) goes into the run's config; extensions into its
    dataset record's ``history`` too, so the run folder says how its schedule came about."""
    info = run.read_info()
    saved = run.config()
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
        with writing(run.data_path):
            run.write_info(info)
    if plan.extend_from is not None or saved.train.patience != cfg.train.patience:
        recorded = saved.model_copy(deep=True)
        recorded.train.epochs = cfg.train.epochs
        recorded.train.patience = cfg.train.patience
        with writing(run.config_path):
            save_config(recorded, run.config_path, header=_config_header(info))


def _config_header(info: dict[str, Any]) -> str:
    """Comment lines for the run's config: the extensions the run went through."""
    lines = []
    for event in info.get("history", []):
        if event.get("event") == "extended":
            old, new = event["epochs"]
            at = event["at_epoch"]
            lines.append(
                f"extended at epoch {at}: train.epochs {old} -> {new}, a new cosine segment "
                f"optim.lr -> optim.lr_min over epochs {at + 1}-{new} (history in {DATA})"
            )
    return "\n".join(lines)


def _resume_command(data: Path, out: Path) -> str:
    return f"ptxseg train --data {shlex.quote(str(data))} --out {shlex.quote(str(out))} --resume"


def interrupted_message(
    out: Path, data: Path, epochs: int, removed: bool, *, command: str | None = None
) -> str:
    """Where an interrupted run stands, and how to go on (``command``: the command that
    continues it, default ``ptxseg train --data DATA --out OUT --resume``)."""
    command = command or _resume_command(data, out)
    if removed:
        return (
            f"training interrupted before its first epoch finished; {out} was removed, run "
            "the same command again to start over"
        )
    run = Run(out)
    last = run.checkpoint("last")
    if not last.is_file():
        return (
            f"training interrupted before its first epoch finished; continue with: "
            f"{command} (it restarts the run from scratch)"
        )
    try:
        done = int(read_checkpoint(last).get("epoch", -1)) + 1
        rows = [r for r in read_metrics(run.metrics_path) if r["epoch"] <= done]
    except PtxsegError:
        done, rows = 0, []
    best = (
        f"; best val IoU {max(r['val_iou'] for r in rows):.4f} at epoch "
        f"{max(rows, key=lambda r: r['val_iou'])['epoch']} ({BEST})" if rows else ""
    )
    return (
        f"training interrupted; {out}: last finished epoch {done} of {epochs} ({LAST})"
        f"{best}; continue with: {command}"
    )


# ------------------------------------------------------------------------------------------
# fine-tuning


def init_checkpoint(value: str | Path) -> Path:
    """The checkpoint ``model.init_from`` names: a run folder's best checkpoint, or a file."""
    path = Path(value)
    if path.is_dir():
        ckpt = Run(path).checkpoint()
        if not ckpt.is_file():
            raise CheckpointError(f"model.init_from: {path}: run folder without {BEST}")
        return ckpt
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path}: no such run folder or checkpoint file")
    return path


def load_init_weights(cfg: Config):
    """The weights ``cfg.model.init_from`` points at (fine-tuning), read by the one
    checkpoint loader and checked against ``cfg``'s architecture and encoder.

    Returns:
        the ``SegModel`` state dict, the checkpoint path, its sha256 and the normalisation
        the weights were trained with (the fine-tuned model keeps it).

    Raises:
        ConfigError: no such run folder/file, or a source of another arch/encoder.
        CheckpointError: unreadable/unsafe checkpoint, or weights that do not fit the model.
    """
    if cfg.model.init_from is None:
        raise ValueError("load_init_weights: model.init_from is not set")
    source = Path(cfg.model.init_from)
    ckpt = init_checkpoint(source)
    run = Run(source)
    fallback = run.config if source.is_dir() and run.config_path.is_file() else cfg
    try:
        model, info = load_checkpoint(ckpt, fallback)
    except CheckpointError as exc:
        raise CheckpointError(f"model.init_from: {exc}") from None
    for key in ("arch", "encoder"):
        a, b = getattr(info.model, key), getattr(cfg.model, key)
        if a.lower() != b.lower():
            raise ConfigError(
                f"model.init_from: {source} was trained with model.{key}={a}, this run "
                f"has model.{key}={b}; fine-tuning needs the same architecture and encoder"
            )
    return model.state_dict(), ckpt, sha256_file(ckpt), info.normalization
