"""Train/validation split: stratified by label, grouped by patient, seeded, written as CSV.

Records are grouped by ``patient_id`` where known (a record without one is its own group), so
a patient never lands on both sides. Groups are stratified by label (a group is positive when
any of its records is; records without ground truth form a third stratum); within each stratum
the groups are shuffled with the seed and taken into validation until the validation share of
that stratum's records is as close as possible to ``val_fraction``. The same records and seed
always give the same split, whatever order the records come in.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from ptxseg.data.records import Record
from ptxseg.errors import DataError
from ptxseg.fileio import write_csv

SPLIT_COLUMNS = ("id", "split", "has_pneumothorax", "patient_id")
SPLITS = ("train", "val")


def _groups(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        key = f"patient:{rec.patient_id}" if rec.patient_id else f"id:{rec.id}"
        groups[key].append(rec)
    return groups


def _stratum(group: list[Record]) -> int:
    labels = [r.has_pneumothorax for r in group]
    if any(v is True for v in labels):
        return 1
    if all(v is None for v in labels):
        return 2
    return 0


def make_split(
    records: list[Record], val_fraction: float = 0.15, seed: int = 42
) -> dict[str, str]:
    """Assign every record to ``"train"`` or ``"val"``.

    Args:
        records: the dataset (ids must be unique).
        val_fraction: wanted share of records in validation, in [0, 1).
        seed: shuffling seed; same inputs and seed -> same split.

    Returns:
        id -> ``"train"`` | ``"val"``, for every record. When there are at least two groups
        and ``val_fraction > 0``, each side gets at least one group.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(None, "cannot split: duplicate record ids")
    groups = _groups(records)
    strata: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        strata[_stratum(groups[key])].append(key)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for s in sorted(strata):
        keys = [strata[s][i] for i in rng.permutation(len(strata[s]))]
        n_total = sum(len(groups[k]) for k in keys)
        target = val_fraction * n_total
        taken = 0
        for key in keys:
            size = len(groups[key])
            if abs(taken + size - target) < abs(taken - target):
                val_groups.add(key)
                taken += size
    if val_fraction > 0 and len(groups) >= 2:
        ordered = sorted(groups, key=lambda k: (len(groups[k]), k))
        if not val_groups:  # tiny dataset: at least one validation group
            val_groups.add(ordered[0])
        if len(val_groups) == len(groups):
            val_groups.discard(ordered[-1])
    return {
        rec.id: ("val" if key in val_groups else "train")
        for key, members in groups.items()
        for rec in members
    }


def _label_cell(value: bool | None) -> str:
    return "" if value is None else str(int(bool(value)))


def write_split(path: str | Path, records: list[Record], assignment: dict[str, str]) -> None:
    """Write ``split.csv`` (columns ``id,split,has_pneumothorax,patient_id``), atomically.

    ``has_pneumothorax`` is 1/0 (empty when unknown); rows follow the records' order.
    """
    missing = [rec.id for rec in records if rec.id not in assignment]
    if missing:
        raise ValueError(f"record '{missing[0]}' has no split assignment")
    rows = (
        (rec.id, assignment[rec.id], _label_cell(rec.has_pneumothorax), rec.patient_id or "")
        for rec in records
    )
    write_csv(path, SPLIT_COLUMNS, rows)


def read_split(path: str | Path) -> dict[str, str]:
    """Read a ``split.csv`` -> id -> ``"train"`` | ``"val"``.

    Raises:
        DataError: missing file, missing columns, an unknown split name, a duplicate id.
    """
    from ptxseg.fileio import read_csv_rows

    path = Path(path)
    header, rows = read_csv_rows(path)
    if "id" not in header or "split" not in header:
        raise DataError(path, f"expected columns id,split, found {','.join(header) or 'none'}")
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        ident, split = row["id"], row["split"].lower()
        if split not in SPLITS:
            raise DataError(path, f"line {i}: split must be train or val, got '{row['split']}'")
        if ident in out:
            raise DataError(path, f"line {i}: duplicate id '{ident}'")
        out[ident] = split
    return out


def partition(
    records: list[Record], assignment: dict[str, str], split_path: Path | None, val_fraction: float
) -> tuple[list[Record], list[Record]]:
    """The (training, validation) records of ``assignment``; with ``split_path`` (a resumed
    run's split) every id of the split must be in the dataset, and images it does not list
    are ignored with a warning.

    Raises:
        DataError: split ids missing from the dataset; an empty side.
    """
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
