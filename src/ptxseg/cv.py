"""The cross-validation folder: its manifest ``cv.json`` and its fold run folders.

A CV folder (``ptxseg train --folds K --out CV``, :mod:`ptxseg.train_cv`) holds one ordinary
run folder per fold (``CV/fold-0`` ... ``CV/fold-K-1``, :func:`fold_name`) and the manifest
``CV/cv.json`` (:class:`CVManifest`, written by :func:`write_manifest` atomically or by
:func:`create_manifest` once among processes that start folds side by side, read and checked
by :func:`read_manifest`)::

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

The later stages take the CV folder where they take a run folder: ``ptxseg tune CV`` chooses
the post-processing on the out-of-fold predictions (:func:`ptxseg.tune.tune_cv`) and writes
``CV/thresholds.json``; ``ptxseg evaluate CV`` and ``ptxseg predict CV`` run the trained folds
(:func:`trained_folds`) as one ensemble (:class:`ptxseg.predictor.Predictor`: the mean
probability). This module imports neither torch nor the model.

A fold is the CV folder's only when it lies inside it and validates on its fold of
``cv.json``: :func:`read_manifest` resolves each fold folder (a symlink to a run elsewhere is
refused, whatever its name says) and :func:`trained_folds`, which tune, evaluate and predict
all go through, compares each fold's ``split.csv`` with ``cv.json`` before any model is
loaded (a run trained on other data, copied in as ``fold-1``, is refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ptxseg import __version__
from ptxseg.data.folds import fold_split
from ptxseg.errors import DataError, RunDirError
from ptxseg.fileio import read_json, resolved, write_json
from ptxseg.run import BEST, Run

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
        return fold_split(self.assignment, fold)

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
    try:
        data = read_json(path, "cross-validation manifest",
                         missing=f"no {MANIFEST} (not a cross-validation folder)")  # fmt: skip
    except DataError as exc:
        raise RunDirError(str(exc)) from None
    manifest = _check(data, path)
    _check_inside(path.parent, manifest)
    return manifest


def _check_inside(root: Path, manifest: CVManifest) -> None:
    """Each fold folder that exists lies inside ``root`` once symlinks are resolved (the
    manifest's check reads only the names).

    Raises:
        RunDirError: a fold folder that is (or lies under) a link to a folder elsewhere.
    """
    inside = resolved(root)
    for i in range(manifest.k):
        fold = manifest.fold_dir(root, i)
        if not os.path.lexists(fold):
            continue
        real = resolved(fold)
        if not real.is_relative_to(inside):
            raise RunDirError(
                f"{fold}: fold {i} of {root} links to {real}, outside the cross-validation "
                "folder (copy the run into it instead)"
            )


def is_cv_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``cv.json`` (a CV folder, not a run folder)."""
    return (Path(path) / MANIFEST).is_file()


def create_manifest(cv_dir: str | Path, manifest: CVManifest) -> CVManifest:
    """Write ``cv_dir/cv.json`` unless it exists; returns the manifest the folder holds.

    Folds started side by side (``--fold I`` on several machines sharing the folder) may
    each try to create it: the complete file is hard-linked into place, so exactly one wins
    and the others read the winner's (the caller compares it with what it wanted).
    """
    path = Path(cv_dir) / MANIFEST
    data = manifest.to_dict()
    _check(data, path)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.new")
    write_json(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: a plain atomic rename
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read_manifest(cv_dir)


def trained_folds(cv_dir: str | Path) -> tuple[CVManifest, list[Run]]:
    """The manifest and the run folder of every fold, each trained (a best checkpoint or an
    ONNX export) and validating on its fold of ``cv.json`` (:func:`check_fold`): what tune,
    evaluate and predict use. Nothing is loaded.

    Raises:
        RunDirError: not a CV folder, a fold outside it, a fold not trained yet (naming the
            command that trains it), or a fold trained on other images.
    """
    manifest = read_manifest(cv_dir)
    runs = [Run(manifest.fold_dir(cv_dir, i)) for i in range(manifest.k)]
    for i, run in enumerate(runs):
        if not (run.checkpoint().is_file() or run.onnx_path.is_file()):
            raise RunDirError(
                f"{run.path}: fold {i} of {cv_dir} is not trained (no {BEST}); train it with "
                f"ptxseg train --data DATA --out {cv_dir} --fold {i}"
            )
    for i, run in enumerate(runs):
        check_fold(manifest, i, run, Path(cv_dir) / MANIFEST)
    return manifest, runs


def check_fold(manifest: CVManifest, fold: int, run: Run, where: str | Path) -> None:
    """Fold ``fold``'s run folder validated on its fold of the manifest (``where``): its
    ``split.csv`` is :meth:`CVManifest.split` of it, image for image.

    Raises:
        RunDirError: no readable ``split.csv``, or one that validates on other images (a run
            trained for another CV folder, or on other data).
    """
    try:
        split = run.split()
    except DataError as exc:
        raise RunDirError(
            f"{exc}; fold {fold} of {Path(where).parent} does not say which images it "
            "validated on"
        ) from None
    if split != manifest.split(fold):
        raise RunDirError(
            f"{run.split_path}: fold {fold} validates on other images than its fold of "
            f"{where}; was it trained for another CV folder or on other data?"
        )
