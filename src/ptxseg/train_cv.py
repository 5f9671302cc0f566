"""Training a cross-validation: ``ptxseg train --folds K --out CV`` and ``--fold I``.

:func:`plan_training` settles the CV folder (:mod:`ptxseg.cv`) before any training: its
manifest is created (the folds of :func:`ptxseg.data.folds.make_folds` with ``train.seed``,
or a ``--split-file`` with ``id,fold`` columns) or, when the folder has one, reused; the
dataset must be the one the manifest was made for. :meth:`CVTraining.train_fold` then trains
one fold as an ordinary run (:func:`ptxseg.train.prepare`) in ``CV/fold-I``, validating on
fold ``I`` and training on the others.

- ``--folds K`` trains every fold, one after the other; ``--fold I`` trains only fold ``I``
  (the manifest is created if absent, reused if present), so folds run side by side on
  several GPUs or machines that share the folder.
- ``--resume`` continues each fold that has started (a plain resume of its run folder, with
  its own config) and starts the others; ``--fold I --resume`` does so for fold ``I``.
- The folds of a CV share their recipe: a fold started next to trained ones must have the
  same config but for what a resume may change (:data:`ptxseg.resume.FREE_KEYS`: hardware,
  patience, epochs, logger); without ``--config`` it takes theirs (:func:`cv_config`).
- A new CV folder whose first fold fails before its first checkpoint is removed again
  (nothing half-made), as a run folder is.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ptxseg.config import Config, load_config
from ptxseg.cv import MANIFEST, CVManifest, create_manifest, is_cv_dir, read_manifest
from ptxseg.data.folds import SplitFile, check_split_file, make_folds
from ptxseg.errors import ConfigError, DataError, RunDirError
from ptxseg.run import Run

if TYPE_CHECKING:
    from ptxseg.train import Training


def cv_config(cv_dir: str | Path, overrides: Sequence[str] = ()) -> Config | None:
    """The config the folds of a CV folder train with: the ``config.yaml`` of its first fold
    that has one, with ``overrides`` (``--set``); ``None`` when no fold has started."""
    cv_dir = Path(cv_dir)
    if not is_cv_dir(cv_dir):
        return None
    manifest = read_manifest(cv_dir)
    for i in range(manifest.k):
        run = Run(manifest.fold_dir(cv_dir, i))
        if run.config_path.is_file():
            return load_config(run.config_path, list(overrides))
    return None


@dataclass
class CVTraining:
    """The folds about to be trained (:func:`plan_training`).

    Args:
        root: the CV folder.
        manifest: its manifest (created or read).
        folds: the folds to train, in order.
        cfg: the resolved config every fold trains with.
        data: the dataset folder.
        resume: continue the folds that have started.
        created: this process created the CV folder (removed again when its first fold fails
            before any checkpoint).
    """

    root: Path
    manifest: CVManifest
    folds: list[int]
    cfg: Config
    data: Path
    resume: bool = False
    created: bool = False
    done: list[Path] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.manifest.k

    def fold_run(self, fold: int) -> Run:
        return Run(self.manifest.fold_dir(self.root, fold))

    def prepare(self, fold: int, *, progress: bool = True) -> Training:
        """Fold ``fold``'s :class:`~ptxseg.train.Training` (a resume where it has started)."""
        from ptxseg.train import prepare

        run = self.fold_run(fold)
        resume = self.resume and run.config_path.is_file()
        if not resume:
            self._check_recipe(fold)
        q = shlex.quote
        command = (
            f"ptxseg train --data {q(str(self.data))} --out {q(str(self.root))} --fold {fold} "
            "--resume"
        )
        return prepare(
            self.cfg, self.data, run.path, resume, progress=progress,
            split=self.manifest.split(fold), resume_command=command,
        )  # fmt: skip

    def train_fold(
        self,
        fold: int,
        *,
        progress: bool = True,
        announce: Callable[[Training], None] | None = None,
    ) -> Path:
        """Prepare and train fold ``fold`` (``announce`` is called with the prepared
        training, before the first step); returns its run folder."""
        with self._failing():
            training = self.prepare(fold, progress=progress)
            if announce is not None:
                announce(training)
            out = training.train()
        self.done.append(out)
        return out

    def _check_recipe(self, fold: int) -> None:
        """A fold started next to trained ones must share their recipe."""
        from ptxseg.resume import FREE_KEYS, recipe_changes

        for i in range(self.k):
            other = self.fold_run(i)
            if i == fold or not other.config_path.is_file():
                continue
            changed = recipe_changes(other.config(), self.cfg)
            if changed:
                raise RunDirError(
                    f"{other.path}: the folds of a cross-validation share their recipe, but "
                    f"fold {fold}'s config differs from fold {i}'s in {changed}; give it the "
                    f"same --config/--set (only {', '.join(sorted(FREE_KEYS))} may differ)"
                )
            return

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A CV folder this process created, whose folds all failed before a checkpoint
        (their folders are removed by the run's own rule), is removed again."""
        try:
            yield
        except BaseException:
            if self.created and not any(
                self.fold_run(i).path.exists() for i in range(self.k)
            ):
                shutil.rmtree(self.root, ignore_errors=True)
            raise


def _dataset_check(manifest: CVManifest, ids: set[str], path: Path) -> None:
    unknown = sorted(i for i in manifest.assignment if i not in ids)
    missing = sorted(i for i in ids if i not in manifest.assignment)
    if unknown or missing:
        what = (
            f"{len(unknown)} of its images are not in the dataset (e.g. '{unknown[0]}')"
            if unknown
            else f"{len(missing)} dataset image(s) have no fold (e.g. '{missing[0]}')"
        )
        raise DataError(path, f"{what}: the CV folder was made for another dataset")


def plan_training(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    *,
    k: int | None = None,
    fold: int | None = None,
    split_file: SplitFile | None = None,
    resume: bool = False,
) -> CVTraining:
    """Settle the CV folder ``out`` (its manifest) and say which folds to train.

    Args:
        cfg: the config every fold trains with.
        data: the dataset folder.
        out: the CV folder: new (absent or empty) for all folds; with ``fold`` or
            ``resume``, an existing CV folder is reused.
        k: number of folds (``--folds``); may be left out when the folder or the split file
            says it.
        fold: train this fold only (``--fold``).
        split_file: a ``--split-file`` with ``id,fold`` columns instead of the seeded folds.
        resume: continue the folds that have started.

    Raises:
        RunDirError: ``out`` is not empty and not a CV folder, a new CV without ``--fold`` or
            ``--resume`` in a used folder, a manifest that disagrees with ``k`` or the split
            file. ConfigError: no ``k`` to create the manifest, ``fold`` out of range.
            DataError: the dataset does not fit (fewer patients than folds, images the
            manifest does not list...).
    """
    from ptxseg.data.sources import load_records
    from ptxseg.train import global_rank

    root, data = Path(out), Path(data)
    exists = is_cv_dir(root)
    used = root.is_dir() and any(root.iterdir())
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{root}: exists and is not a folder")
    if used and not exists:
        raise RunDirError(
            f"{root}: not empty and not a cross-validation folder (no {MANIFEST}); choose "
            "another --out"
        )
    if exists and fold is None and not resume:
        raise RunDirError(
            f"{root}: already holds a cross-validation; use --resume to continue its folds, "
            "--fold I to train one of them, or choose another --out"
        )
    if resume and fold is None and not exists:
        raise RunDirError(f"{root}: no cross-validation to resume (no {MANIFEST})")
    if split_file is not None and split_file.kind != "fold":
        raise ConfigError(
            f"--split-file: {split_file.path} has id,split columns (one train/val split); "
            "cross-validation folds need id,fold columns"
        )
    records, _layout = load_records(data, cfg.data.layout, rle=cfg.data.rle)
    ids = {r.id for r in records}
    created = False
    if exists:
        manifest = read_manifest(root)
        if k is not None and k != manifest.k:
            raise RunDirError(f"{root / MANIFEST}: holds {manifest.k} folds, not --folds {k}")
        _dataset_check(manifest, ids, root / MANIFEST)
        if split_file is not None:
            wanted = check_split_file(split_file, records)
            if wanted != manifest.assignment:
                raise RunDirError(
                    f"{root / MANIFEST}: holds other folds than {split_file.path}; train into "
                    "another --out"
                )
    else:
        if split_file is not None:
            assignment = {i: int(f) for i, f in check_split_file(split_file, records).items()}
            if k is not None and k != split_file.k:
                raise ConfigError(f"--folds {k}: {split_file.path} has {split_file.k} folds")
            manifest = CVManifest(
                split_file.k, None, assignment, source=str(split_file.path.resolve())
            )
        elif k is None:
            raise ConfigError(
                f"--fold {fold}: {root} has no {MANIFEST} yet; give the number of folds with "
                "--folds K (or a --split-file with id,fold columns)"
            )
        else:
            manifest = CVManifest(k, cfg.train.seed, make_folds(records, k, cfg.train.seed))
        if global_rank() == 0:
            created = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            made = create_manifest(root, manifest)
            if made.k != manifest.k or made.assignment != manifest.assignment:
                raise RunDirError(
                    f"{root / MANIFEST}: another process created it with other folds "
                    f"({made.source}, {made.k} folds); start the folds with the same --folds, "
                    "seed and dataset"
                )
    if fold is not None and not 0 <= fold < manifest.k:
        raise ConfigError(f"--fold {fold}: {root} has folds 0..{manifest.k - 1}")
    folds = [fold] if fold is not None else list(range(manifest.k))
    return CVTraining(root, manifest, folds, cfg, data, resume=resume, created=created)
