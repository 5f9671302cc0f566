"""The run folder: the one owner of its file names and of the rules that read them.

``ptxseg train`` writes a run folder and every later stage reads it (nnU-Net's results folder,
timm's output folder: the run can be repeated and used from it alone)::

    config.yaml      CONFIG      the resolved config (YAML + --set)
    split.csv        SPLIT       train/val side of every image id
    data.json        DATA        the dataset (root, layout, run-length CSV), a fine-tune
                                 source, the history of extensions
    weights.json     WEIGHTS     a local encoder-weights file: its sha256 and what was
                                 loaded (:mod:`ptxseg.weights`)
    best.ckpt        BEST        weights of the best validation IoU (self-describing)
    last.ckpt        LAST        the last finished epoch (resume)
    metrics.csv      METRICS     one row per epoch
    curves.png       CURVES      training curves
    thresholds.json  THRESHOLDS  the post-processing chosen by ``ptxseg tune``
    model.onnx       ONNX        the ``ptxseg export`` of ``best.ckpt``

The names are spelled here only; every other module asks :class:`Run` for a path. A
checkpoint describes its own model (:mod:`ptxseg.checkpoint`), so ``best.ckpt`` copied alone
into an empty folder still predicts; ``config.yaml`` is read only for what a checkpoint does
not say (a checkpoint of an older ptxseg, the dataset settings of a resume).

Thresholds follow one rule (:meth:`Run.thresholds`, the rule of evaluate and predict):
``--thresholds FILE`` when given (a missing file is an error); else ``RUN/thresholds.json``
when the run was tuned; else :data:`~ptxseg.postprocess.DEFAULT_PARAMS` (``probs > 0.5``, no
component removal) with one warning, the source recorded as ``"default"``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptxseg.choices import Choice
from ptxseg.config import Config, load_config
from ptxseg.data.records import Record
from ptxseg.errors import ConfigError, DataError, RunDirError
from ptxseg.fileio import read_json, write_json
from ptxseg.postprocess import (
    DEFAULT_PARAMS,
    DEFAULT_SOURCE,
    PostParams,
    load_params,
    with_model_size,
)

CONFIG = "config.yaml"
SPLIT = "split.csv"
DATA = "data.json"
WEIGHTS = "weights.json"
BEST = "best.ckpt"
LAST = "last.ckpt"
METRICS = "metrics.csv"
CURVES = "curves.png"
THRESHOLDS = "thresholds.json"
ONNX = "model.onnx"
CHECKPOINTS = {"best": BEST, "last": LAST}
#: what a run that stopped before its first checkpoint may hold besides config/split/data
STALE = (BEST, METRICS, CURVES)


class Split(Choice):
    """Which images of a dataset to take (``--split``): all, or one side of ``split.csv``."""

    ALL = "all"
    VAL = "val"
    TRAIN = "train"


@dataclass(frozen=True)
class RecordedDataset:
    """The dataset a run was trained on, as far as its ``data.json`` says."""

    root: Path | None = None
    layout: str | None = None
    rle: Path | None = None


@dataclass(frozen=True)
class Thresholds:
    """The post-processing rule a stage uses and the file it came from (``None``: the
    default rule)."""

    params: PostParams
    path: Path | None

    @property
    def source(self) -> str:
        return DEFAULT_SOURCE if self.path is None else str(self.path)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


class Run:
    """A run folder (see the module doc). Creating one checks nothing; :meth:`open` checks
    that the folder exists."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The run folder ``path``; RunDirError when it is not a folder."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: run folder not found")
        return run

    # -- files ---------------------------------------------------------------------------------

    config_path = property(lambda self: self.path / CONFIG)
    split_path = property(lambda self: self.path / SPLIT)
    data_path = property(lambda self: self.path / DATA)
    weights_path = property(lambda self: self.path / WEIGHTS)
    metrics_path = property(lambda self: self.path / METRICS)
    curves_path = property(lambda self: self.path / CURVES)
    thresholds_path = property(lambda self: self.path / THRESHOLDS)
    onnx_path = property(lambda self: self.path / ONNX)

    def checkpoint(self, which: str = "best") -> Path:
        """``best.ckpt`` or ``last.ckpt``."""
        if which not in CHECKPOINTS:
            raise ValueError(f"which: 'best' or 'last', not {which!r}")
        return self.path / CHECKPOINTS[which]

    def config(self) -> Config:
        """The resolved config saved in the run."""
        path = self.config_path
        if not path.exists():
            raise ConfigError(f"{path}: missing (is {self.path} a ptxseg run folder?)")
        return load_config(path)

    def load_model(self, which: str = "best", checkpoint: str | Path | None = None):
        """The model of ``checkpoint`` (default: the run's ``best.ckpt``) and its
        :class:`~ptxseg.checkpoint.CheckpointInfo`; the run's ``config.yaml`` is read only for
        a checkpoint that does not describe itself (:func:`ptxseg.checkpoint.load_checkpoint`).
        """
        from ptxseg.checkpoint import load_checkpoint

        path = Path(checkpoint) if checkpoint is not None else self.checkpoint(which)
        return load_checkpoint(path, self.config)

    # -- the dataset and its split -------------------------------------------------------------

    def read_info(self) -> dict[str, Any]:
        """``data.json`` as a dict (empty when absent or unreadable: it is rewritten)."""
        try:
            info = read_json(self.data_path, "dataset record")
        except DataError:
            return {}
        return info if isinstance(info, dict) else {}

    def write_info(self, info: dict[str, Any]) -> None:
        write_json(self.data_path, info)

    def dataset(self) -> RecordedDataset:
        """The dataset recorded in ``data.json`` (keys ``root``/``path``, ``layout``, ``rle``).

        Raises:
            RunDirError: a ``data.json`` that is not a readable JSON object.
        """
        path = self.data_path
        if not os.path.lexists(path):
            return RecordedDataset()
        try:
            obj = read_json(path, "dataset record")
        except DataError as exc:
            raise RunDirError(str(exc)) from None
        if not isinstance(obj, dict):
            raise RunDirError(f"{path}: cannot read (not a JSON object)")
        root = obj.get("root") or obj.get("path") or obj.get("data")
        rle = obj.get("rle")
        return RecordedDataset(
            Path(root) if root else None, obj.get("layout"), Path(rle) if rle else None
        )

    def split(self) -> dict[str, str]:
        """``split.csv``: id -> ``"train"`` | ``"val"``."""
        from ptxseg.data.split import read_split

        return read_split(self.split_path)

    def records(
        self,
        data: str | Path | None,
        layout: str = "auto",
        split: str | Split = Split.VAL,
        rle: str | Path | None = None,
    ) -> tuple[list[Record], Path, str]:
        """Records of ``data`` (default: the run's recorded dataset), restricted to one side
        of ``split.csv`` unless ``split`` is ``all``. Every record must have a ground truth.

        ``rle`` picks the run-length CSV of a siim folder (``--rle``); without it, the CSV the
        run recorded is used when ``data`` is the recorded dataset, else the folder's own.

        Returns:
            records (sorted by id), the dataset root, the layout used.
        """
        from ptxseg.data.sources import load_records

        split = Split.parse(split, "--split")
        recorded = self.dataset()
        if data is None:
            if recorded.root is None:
                raise RunDirError(
                    f"{self.path}: the run does not record its dataset; pass --data DATA"
                )
            root = recorded.root
        else:
            root = Path(data)
        same = recorded.root is not None and _same_path(root, recorded.root)
        if same and layout == "auto" and recorded.layout:
            layout = recorded.layout
        if rle is None and same and recorded.rle is not None and layout in ("auto", "siim"):
            rle = recorded.rle
        records, used = load_records(root, layout, rle=rle)
        if split is not Split.ALL:
            records = self._side(records, root, split)
        no_gt = [r for r in records if r.mask is None]
        if no_gt:
            raise DataError(
                root,
                f"{len(no_gt)} of {len(records)} images have no ground-truth mask "
                f"(e.g. '{no_gt[0].id}'); evaluation needs masks",
            )
        if not records:
            raise DataError(root, "no images to evaluate")
        return records, root, used

    def _side(self, records: list[Record], root: Path, split: Split) -> list[Record]:
        path = self.split_path
        if not path.exists():
            raise RunDirError(f"{path}: missing (needed to find the {split} images)")
        wanted = sorted(i for i, side in self.split().items() if side == split)
        if not wanted:
            raise RunDirError(f"{path}: no '{split}' images")
        by_id = {r.id: r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataError(
                root,
                f"{len(missing)} of the {len(wanted)} {split} images of {path} are not in "
                f"this dataset (e.g. '{missing[0]}'); is it the dataset the run was trained on?",
            )
        return [by_id[i] for i in wanted]

    # -- thresholds ----------------------------------------------------------------------------

    def default_rule_warning(self) -> str:
        """The one warning of evaluate and predict when the run was never tuned."""
        return (
            f"{self.thresholds_path} not found: using the default rule "
            f"{DEFAULT_PARAMS.describe()} (run `ptxseg tune {self.path}` to choose them)"
        )

    def thresholds(self, explicit: str | Path | None = None, size: int | None = None):
        """The post-processing rule (see the module doc); a file that does not say its model
        ``size`` (a hand-written one) gets ``size``: its areas are at model resolution.

        Warns:
            UserWarning: neither ``explicit`` nor ``RUN/thresholds.json`` exists.

        Raises:
            DataError: an explicit file that is missing, or any unreadable/invalid file.
        """
        path = Path(explicit) if explicit is not None else self.thresholds_path
        if explicit is None and not path.exists():
            warnings.warn(self.default_rule_warning(), UserWarning, stacklevel=2)
            return Thresholds(DEFAULT_PARAMS, None)
        params = load_params(path)
        return Thresholds(params if size is None else with_model_size(params, size), path)

    # -- new runs and resumes ------------------------------------------------------------------

    def check_new(self) -> None:
        """A new run's folder must be absent or empty."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunDirError(f"{out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            raise RunDirError(
                f"{out}: already exists and is not empty; use --resume to continue that run, "
                "or choose another --out"
            )

    def check_resumable(self) -> None:
        """A run to resume: a folder with its ``config.yaml``."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run folder to resume")
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path}: not a run folder to resume (no {CONFIG})")

    def remove_stale(self) -> None:
        """Outputs of a start that died before its first ``last.ckpt`` (restarted from
        scratch), and temporary files of a write killed half-way."""
        for name in STALE:
            (self.path / name).unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
