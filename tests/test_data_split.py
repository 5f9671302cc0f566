"""Split: stratified, grouped by patient, seeded, deterministic; split.csv round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ptxseg.data.records import Record
from ptxseg.data.split import make_split, read_split, write_split
from ptxseg.errors import DataError


def _records(n_pos=40, n_neg=60, patients=None):
    recs = []
    for i in range(n_pos + n_neg):
        pid = None if patients is None else f"P{i // patients}"
        recs.append(Record(f"r{i:03d}", Path(f"r{i}.png"), Path(f"m{i}.png"), i < n_pos, pid))
    return recs


def test_stratified_85_15_and_deterministic():
    recs = _records()
    a = make_split(recs, 0.15, seed=1)
    assert set(a) == {r.id for r in recs}
    val = [r for r in recs if a[r.id] == "val"]
    assert sum(r.has_pneumothorax for r in val) == 6  # round(0.15 * 40)
    assert sum(not r.has_pneumothorax for r in val) == 9  # round(0.15 * 60)
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert make_split(shuffled, 0.15, seed=1) == a  # order does not matter
    assert make_split(recs, 0.15, seed=2) != a  # the seed does


def test_grouped_by_patient():
    recs = _records(30, 60, patients=3)  # 30 patients with 3 images each
    a = make_split(recs, 0.2, seed=0)
    sides: dict[str, set[str]] = {}
    for r in recs:
        sides.setdefault(r.patient_id, set()).add(a[r.id])
    assert all(len(s) == 1 for s in sides.values())
    n_val = sum(v == "val" for v in a.values())
    assert n_val == 18  # 2 positive + 4 negative patients of 3 images


def test_tiny_dataset_gets_both_sides():
    recs = _records(1, 2)
    a = make_split(recs, 0.15, seed=0)
    assert sorted(a.values()).count("val") == 1


def test_bad_fraction_and_duplicates():
    with pytest.raises(ValueError):
        make_split(_records(), 1.0)
    recs = _records(1, 1)
    with pytest.raises(DataError, match="duplicate"):
        make_split(recs + recs[:1])


def test_write_read_round_trip(tmp_path):
    recs = _records(5, 5, patients=2) + [Record("nogt", Path("x.dcm"), None, None, None)]
    a = make_split(recs, 0.3, seed=3)
    write_split(tmp_path / "split.csv", recs, a)
    lines = (tmp_path / "split.csv").read_text().splitlines()
    assert lines[0] == "id,split,has_pneumothorax,patient_id"
    assert lines[1] == f"r000,{a['r000']},1,P0"
    assert lines[-1] == f"nogt,{a['nogt']},,"
    assert read_split(tmp_path / "split.csv") == a
    (tmp_path / "bad.csv").write_text("id,split\na,test\n")
    with pytest.raises(DataError, match="split must be train or val"):
        read_split(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("name,fold\na,1\n")
    with pytest.raises(DataError, match="expected columns id,split"):
        read_split(tmp_path / "bad2.csv")
