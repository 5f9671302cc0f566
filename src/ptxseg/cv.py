"""Cross-validation: the CV folder's manifest, out-of-fold tuning and fold ensembles.

A CV folder (``ptxseg train --folds K --out CV``) holds one ordinary run folder per fold
(``CV/fold-0`` ... ``CV/fold-K-1``, :func:`fold_name`) and the manifest ``CV/cv.json``
(:class:`CVManifest`, written by :func:`write_manifest` atomically, read and checked by
:func:`read_manifest`)::

    {
      "format": "ptxseg-cv",
      "version": 1,
      "ptxseg_version": "0.1.0",
      "k": 3,
      "seed": 42,                 # the folds' seed (null: folds from a split file)
      "source": "folds",          # "folds" (make_folds) or the --split-file path
      "folds": ["fold-0", "fold-1", "fold-2"],   # run folders, relative to CV/
      "assignment": {"<image id>": 0, ...}       # each image's validation fold
    }

Fold ``i``'s run validates on the images whose fold is ``i`` and trains on the others
(:meth:`CVManifest.split`, the same assignment its ``split.csv`` holds).

Out-of-fold tuning (:func:`pool_grid_stats`, :func:`tune_out_of_fold`): each fold's model
predicts its own validation images only, so every image is predicted exactly once, by the
model that did not train on it; the per-fold grid statistics
(:class:`~ptxseg.tune.GridStats`) are pooled (concatenated over images) and searched as one
set with :func:`ptxseg.tune.search`: the chosen rule is the best pooled IoU (or mean per-image
Dice) over all the training images, not over one small split.

Ensembles (:func:`mean_probs`, :class:`Ensemble`): the members' probability maps averaged
pixel by pixel (the mean probability), each member's own test-time augmentation applied
before averaging; any list of models of the same input size can be ensembled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ptxseg import __version__
from ptxseg.errors import RunDirError
from ptxseg.fileio import read_text, write_json
from ptxseg.tune import GridStats, TuneResult, search

MANIFEST = "cv.json"
FORMAT = "ptxseg-cv"
VERSION = 1


def fold_name(fold: int) -> str:
    """The run folder of fold ``fold`` inside a CV folder: ``fold-0``, ``fold-1``..."""
    return f"fold-{int(fold)}"


# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass
class CVManifest:
    """What ``cv.json`` holds (see the module doc).

    Args:
        k: number of folds (>= 2).
        seed: seed of :func:`~ptxseg.data.folds.make_folds` (``None``: from a split file).
        assignment: image id -> validation fold in ``0..k-1``; every fold non-empty.
        folds: the fold run folders relative to the CV folder (default ``fold-0``...).
        source: ``"folds"`` or the split file the assignment came from.
        ptxseg_version: the version that wrote it.
    """

    k: int
    seed: int | None
    assignment: dict[str, int]
    folds: list[str] | None = None
    source: str = "folds"
    ptxseg_version: str = __version__

    def __post_init__(self) -> None:
        if self.folds is None:
            self.folds = [fold_name(i) for i in range(self.k)]

    def fold_dir(self, root: str | Path, fold: int) -> Path:
        """Fold ``fold``'s run folder under the CV folder ``root``."""
        return Path(root) / self.folds[fold]

    def val_ids(self, fold: int) -> list[str]:
        """The images fold ``fold``'s model validates on (and predicts out of fold)."""
        return [i for i, f in self.assignment.items() if f == fold]

    def split(self, fold: int) -> dict[str, str]:
        """Fold ``fold``'s ``train``/``val`` assignment (its ``split.csv``)."""
        return {i: ("val" if f == fold else "train") for i, f in self.assignment.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "ptxseg_version": self.ptxseg_version,
            "k": self.k,
            "seed": self.seed,
            "source": self.source,
            "folds": list(self.folds or []),
            "assignment": dict(self.assignment),
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(data: Any, where: str | Path) -> CVManifest:
    """A manifest from its JSON object, or a one-line RunDirError naming ``where``."""

    def bad(problem: str) -> RunDirError:
        return RunDirError(f"{where}: {problem}")

    if not isinstance(data, dict):
        raise bad("not a cross-validation manifest (expected a JSON object)")
    if data.get("format") != FORMAT:
        raise bad(f"not a cross-validation manifest (format {data.get('format')!r}, "
                  f"expected {FORMAT!r})")
    version = data.get("version")
    if not _is_int(version) or version < 1:
        raise bad(f"'version' must be a positive integer, got {version!r}")
    if version > VERSION:
        raise bad(f"written by a newer ptxseg (manifest version {version}, this one reads "
                  f"{VERSION}); upgrade ptxseg")
    for key in ("k", "seed", "folds", "assignment"):
        if key not in data:
            raise bad(f"missing '{key}'")
    k, seed, folds, assignment = data["k"], data["seed"], data["folds"], data["assignment"]
    if not _is_int(k) or k < 2:
        raise bad(f"'k' must be an integer >= 2, got {k!r}")
    if seed is not None and not _is_int(seed):
        raise bad(f"'seed' must be an integer or null, got {seed!r}")
    if not isinstance(folds, list) or len(folds) != k:
        raise bad(f"'folds' must list the {k} fold run folders, got {folds!r}"[:200])
    for name in folds:
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or name.startswith("/") or "\\" in name or ".." in parts:
            raise bad(f"'folds': {name!r} is not a folder inside the CV folder")
    if len(set(folds)) != k:
        raise bad("'folds': a run folder is listed twice")
    if not isinstance(assignment, dict) or not assignment:
        raise bad("'assignment' must map each image id to its validation fold")
    for ident, fold in assignment.items():
        if not _is_int(fold) or not 0 <= fold < k:
            raise bad(f"'assignment': image '{ident}' has fold {fold!r}, expected 0..{k - 1}")
    empty = sorted(set(range(k)) - set(assignment.values()))
    if empty:
        raise bad(f"'assignment': fold {empty[0]} has no image")
    source = data.get("source", "folds")
    written = data.get("ptxseg_version", "")
    if not isinstance(source, str) or not isinstance(written, str):
        raise bad("'source' and 'ptxseg_version' must be strings")
    return CVManifest(k, seed, dict(assignment), list(folds), source, written)


def write_manifest(cv_dir: str | Path, manifest: CVManifest) -> Path:
    """Check ``manifest`` and write ``cv_dir/cv.json`` atomically; returns its path.

    Raises:
        RunDirError: an inconsistent manifest (the same checks as :func:`read_manifest`).
    """
    path = Path(cv_dir) / MANIFEST
    data = manifest.to_dict()
    _check(data, path)
    write_json(path, data)
    return path


def read_manifest(cv_dir: str | Path) -> CVManifest:
    """Read and check a CV folder's ``cv.json`` (``cv_dir`` may name the file itself).

    Raises:
        RunDirError: no manifest, not JSON, or an inconsistent one (wrong format, a newer
            version, folds that do not match ``k``, an image's fold out of range, an empty
            fold, a fold folder outside the CV folder).
    """
    path = Path(cv_dir)
    if path.is_dir():
        path = path / MANIFEST
        if not path.is_file():
            raise RunDirError(f"{cv_dir}: not a cross-validation folder (no {MANIFEST})")
    text = read_text(path, "manifest", missing=f"no {MANIFEST} (not a cross-validation folder)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return _check(data, path)


def is_cv_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``cv.json`` (a CV folder, not a run folder)."""
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# out-of-fold tuning


def pool_grid_stats(per_fold: Sequence[GridStats]) -> GridStats:
    """One :class:`~ptxseg.tune.GridStats` of all the folds' images: each fold's statistics
    (its model on its own validation images) concatenated, fold after fold.

    Raises:
        ValueError: no folds, or folds tuned on different grids.
    """
    if not per_fold:
        raise ValueError("no folds to pool")
    first = per_fold[0]
    pooled = GridStats(thresholds=tuple(first.thresholds), areas=tuple(first.areas))
    for i, stats in enumerate(per_fold):
        if tuple(stats.thresholds) != pooled.thresholds or tuple(stats.areas) != pooled.areas:
            raise ValueError(f"fold {i} was counted on another grid than fold 0")
        pooled.pred.extend(stats.pred)
        pooled.tp.extend(stats.tp)
        pooled.true_area.extend(stats.true_area)
    return pooled


def tune_out_of_fold(
    per_fold: Sequence[GridStats],
    *,
    mode: str = "pixel",
    objective: str = "iou",
    size: int | None = None,
) -> TuneResult:
    """The post-processing rule chosen on the out-of-fold predictions:
    :func:`ptxseg.tune.search` over :func:`pool_grid_stats` of the folds."""
    return search(pool_grid_stats(per_fold), mode=mode, objective=objective, size=size)


# ---------------------------------------------------------------------------------------------
# ensembles


def mean_probs(maps: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
    """The ensemble's probabilities: the members' maps averaged pixel by pixel (float32).

    Args:
        maps: one probability map (or batch of maps) per member, all of one shape and all
            numpy arrays or all torch tensors.

    Shape:
        - each map: any, e.g. ``(B, S, S)``
        - returns the same shape, float32 (numpy in, numpy out; torch in, torch out)

    Raises:
        ValueError: no maps, maps of different shapes, or a mix of numpy and torch.
    """
    if not maps:
        raise ValueError("an ensemble needs at least one member")
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"members' probability maps differ in shape: {sorted(shapes)}")
    if all(isinstance(m, torch.Tensor) for m in maps):
        total = torch.zeros_like(maps[0], dtype=torch.float32)
        for m in maps:
            total += m.to(torch.float32)
        return total / len(maps)
    if any(isinstance(m, torch.Tensor) for m in maps):
        raise ValueError("members' probability maps mix numpy arrays and torch tensors")
    total_np = np.zeros(maps[0].shape, np.float32)
    for m in maps:
        total_np += np.asarray(m, np.float32)
    return total_np / np.float32(len(maps))


def _member_probs(member: Any, x: np.ndarray, tta: str) -> np.ndarray:
    if isinstance(member, torch.nn.Module):
        from ptxseg.predictor import TorchModel

        device = next(member.parameters()).device.type
        return TorchModel(member, device).probs(x, tta)
    return member.probs(x, tta)


class Ensemble:
    """Several models predicting as one: a :class:`~ptxseg.predictor.Member` backend whose
    probabilities are :func:`mean_probs` of its members', each member applying ``tta`` itself
    before the average.

    Args:
        members: torch models (run with :class:`ptxseg.predictor.TorchModel`) or objects with
            ``probs(x, tta)`` (an ONNX backend, another ensemble...), all of one input size.
        names: what each member is (its run folder), for the outputs that list the members.

    Shape:
        - x: ``(B, 1, S, S)`` uint8
        - returns ``(B, S, S)`` float32
    """

    def __init__(self, members: Sequence[Any], names: Sequence[str] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if names is not None and len(names) != len(members):
            raise ValueError(f"{len(names)} names for {len(members)} members")
        self.members = list(members)
        default = [f"member-{i}" for i in range(len(members))]
        self.names = list(names) if names is not None else default
        first = self.members[0]
        if isinstance(first, torch.nn.Module):
            self.device = next(first.parameters()).device
        else:
            self.device = torch.device(getattr(first, "device", "cpu"))

    def __len__(self) -> int:
        return len(self.members)

    def probs(self, x: np.ndarray, tta: str = "none") -> np.ndarray:
        return mean_probs([_member_probs(m, x, tta) for m in self.members])

    def describe(self) -> dict[str, Any]:
        """What metrics.json and results record about the ensemble: members and the rule."""
        return {"members": list(self.names), "combine": "mean probability"}

