"""K-fold cross-validation folds and user-supplied split files.

:func:`make_folds` follows :func:`ptxseg.data.split.make_split`'s conventions: records are
grouped by ``patient_id`` where known (a record without one is its own group), groups are
stratified by label (positive when any record is; no ground truth at all: a third stratum),
the groups of each stratum are shuffled with the seed (after sorting, so the input order does
not matter), and the same records and seed always give the same folds. Each group then goes,
largest first (the shuffle breaks ties), to the fold holding the fewest records of its stratum
(ties: the fewest records overall, then the lowest fold number). So every record is in exactly
one validation fold, no patient is in two, and each fold's share of positives is the
dataset's, within the size of one group.

Fold ``i``'s run trains on every other fold and validates on fold ``i``
(:func:`fold_split`: the ``train``/``val`` assignment its ``split.csv`` holds).

A split file (``--split-file CSV``, :func:`read_split_file`) gives the assignment instead:
columns ``id,fold`` (integers ``0..K-1``, every fold used, ``K >= 2``) or ``id,split``
(``train``/``val``); other columns are ignored. :func:`check_split_file` matches it against
the dataset: an id the dataset does not have, a dataset image without a row, a bad value, a
duplicate id are each one :class:`~ptxseg.errors.DataError` naming the file (and the line).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptxseg.data.records import Record
from ptxseg.data.split import SPLITS, _groups, _stratum
from ptxseg.errors import DataError

SPLIT_FILE_KINDS = ("fold", "split")


def make_folds(records: list[Record], k: int = 5, seed: int = 42) -> dict[str, int]:
    """Assign every record to one of ``k`` validation folds.

    Args:
        records: the dataset (ids must be unique).
        k: number of folds, at least 2 and at most the number of groups (patients, or images
            without a patient id).
        seed: shuffling seed; same records (in any order) and seed -> same folds.

    Returns:
        id -> fold number in ``0..k-1``, for every record; every fold is non-empty.

    Raises:
        DataError: duplicate ids, or fewer groups than folds.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(None, "cannot make folds: duplicate record ids")
    groups = _groups(records)
    if len(groups) < k:
        what = "patients/images" if any(r.patient_id for r in records) else "images"
        raise DataError(
            None, f"cannot make {k} folds from {len(groups)} {what}: use fewer folds"
        )
    strata: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        strata[_stratum(groups[key])].append(key)
    rng = np.random.default_rng(seed)
    total = np.zeros(k, np.int64)
    fold_of: dict[str, int] = {}
    for s in sorted(strata):
        keys = [strata[s][i] for i in rng.permutation(len(strata[s]))]
        keys.sort(key=lambda key: -len(groups[key]))  # stable: the shuffle breaks ties
        in_stratum = np.zeros(k, np.int64)
        for key in keys:
            fold = int(np.lexsort((np.arange(k), total, in_stratum))[0])
            fold_of[key] = fold
            in_stratum[fold] += len(groups[key])
            total[fold] += len(groups[key])
    return {rec.id: fold_of[key] for key, members in groups.items() for rec in members}


def fold_split(folds: dict[str, int], fold: int) -> dict[str, str]:
    """The ``train``/``val`` assignment of fold ``fold``'s run: its own fold is ``val``."""
    if fold not in set(folds.values()):
        raise ValueError(f"fold {fold} has no image (folds: {sorted(set(folds.values()))})")
    return {ident: ("val" if f == fold else "train") for ident, f in folds.items()}


# ---------------------------------------------------------------------------------------------
# user-supplied split files


@dataclass(frozen=True)
class SplitFile:
    """A split file as read: ``kind`` ``"fold"`` (``assignment``: id -> fold number) or
    ``"split"`` (id -> ``"train"``/``"val"``); ``lines``: id -> the line it is on."""

    path: Path
    kind: str
    assignment: dict[str, int | str]
    lines: dict[str, int]

    @property
    def k(self) -> int | None:
        """Number of folds (``None`` for a train/val split)."""
        return None if self.kind == "split" else len(set(self.assignment.values()))


def read_split_file(path: str | Path) -> SplitFile:
    """Read a ``--split-file``: ``id,fold`` or ``id,split`` columns (see the module doc).

    Raises:
        DataError: (naming the file, and the line where one applies) a missing or unreadable
            file, neither or both of the ``fold``/``split`` columns, an empty id, a duplicate
            id, a fold that is not an integer >= 0, a split that is not train/val, fold numbers
            that skip one (``0..K-1`` must all be used), fewer than 2 folds, an empty side.
    """
    from ptxseg.data.sources import read_csv_lines

    path = Path(path)
    header, rows, lines = read_csv_lines(path)
    kinds = [c for c in SPLIT_FILE_KINDS if c in header]
    if "id" not in header or len(kinds) != 1:
        found = ",".join(header) or "none"
        why = "both fold and split" if len(kinds) == 2 else f"found {found}"
        raise DataError(path, f"expected columns id,fold or id,split ({why})")
    kind = kinds[0]
    out: dict[str, int | str] = {}
    where: dict[str, int] = {}
    for row, line in zip(rows, lines, strict=True):
        ident, raw = row["id"], row[kind]
        if not ident:
            raise DataError(path, f"line {line}: empty id")
        if ident in out:
            raise DataError(
                path, f"line {line}: duplicate id '{ident}' (also on line {where[ident]})"
            )
        if kind == "fold":
            if not raw.isdigit() or not raw.isascii():
                raise DataError(
                    path, f"line {line}: fold must be an integer >= 0, got '{raw}'"
                )
            value: int | str = int(raw)
        else:
            value = raw.lower()
            if value not in SPLITS:
                raise DataError(path, f"line {line}: split must be train or val, got '{raw}'")
        out[ident] = value
        where[ident] = line
    if not out:
        raise DataError(path, "no rows")
    if kind == "fold":
        used = sorted(set(out.values()))
        k = int(used[-1]) + 1
        missing = sorted(set(range(k)) - set(used))
        if missing:
            raise DataError(
                path, f"fold {missing[0]} has no image (folds are numbered 0..K-1, all used; "
                f"found {', '.join(map(str, used))})"
            )
        if k < 2:
            raise DataError(path, "only one fold (0): cross-validation needs at least 2")
    else:
        for side in SPLITS:
            if side not in out.values():
                raise DataError(path, f"no image in the {side} split")
    return SplitFile(path, kind, out, where)


def check_split_file(split: SplitFile, records: list[Record]) -> dict[str, int | str]:
    """Match a split file against the dataset; returns its assignment.

    Raises:
        DataError: an id in the file that the dataset does not have (its line), or dataset
            images without a row (how many, and one of them).

    Warns:
        UserWarning: a patient whose images are in different folds / on both sides (the file
            is the user's choice; its validation scores are then optimistic).
    """
    ids = {r.id for r in records}
    for ident, line in split.lines.items():
        if ident not in ids:
            raise DataError(
                split.path, f"line {line}: unknown id '{ident}' (not in the dataset)"
            )
    missing = [r.id for r in records if r.id not in split.assignment]
    if missing:
        raise DataError(
            split.path,
            f"{len(missing)} dataset image(s) have no row (e.g. '{missing[0]}'); every image "
            f"needs a {split.kind}",
        )
    seen: dict[str, set] = defaultdict(set)
    for rec in records:
        if rec.patient_id:
            seen[rec.patient_id].add(split.assignment[rec.id])
    mixed = sorted(p for p, values in seen.items() if len(values) > 1)
    if mixed:
        what = "folds" if split.kind == "fold" else "splits"
        warnings.warn(
            f"{split.path}: {len(mixed)} patient(s) have images in different {what} (e.g. "
            f"'{mixed[0]}'): validation scores will be optimistic",
            UserWarning,
            stacklevel=2,
        )
    return dict(split.assignment)


def given_split(split: SplitFile | Mapping[str, str], records: list[Record]) -> dict[str, str]:
    """The train/val assignment of one run given instead of the seeded split: a split file
    with ``id,split`` columns (:func:`check_split_file`) or a mapping (a fold of a CV), matched
    against the dataset: every image needs a side and every id an image.

    Raises:
        DataError: a split file with ``id,fold`` columns (folds: ``--folds``), an id the
            dataset does not have, a dataset image without a side.
    """
    if isinstance(split, SplitFile):
        if split.kind != "split":
            raise DataError(
                split.path, "has id,fold columns (cross-validation folds): train them with "
                "--folds, or give id,split columns for one run"
            )
        return {i: str(side) for i, side in check_split_file(split, records).items()}
    ids = {r.id for r in records}
    unknown = sorted(i for i in split if i not in ids)
    missing = [r.id for r in records if r.id not in split]
    if unknown or missing:
        what = (f"{len(unknown)} id(s) are not in the dataset (e.g. '{unknown[0]}')" if unknown
                else f"{len(missing)} dataset image(s) have no side (e.g. '{missing[0]}')")
        raise DataError(None, f"the given train/val split does not fit the dataset: {what}")
    return dict(split)
