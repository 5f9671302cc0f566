"""K folds (patient-grouped, stratified, seeded) and user-supplied split files."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptxseg.data.folds import (
    check_split_file,
    fold_split,
    make_folds,
    read_split_file,
)
from ptxseg.data.records import Record
from ptxseg.data.sources import load_records
from ptxseg.errors import DataError


def _patients(n_patients=60, seed=0, with_unknown=0):
    """Records of patients with 1-4 images each; a patient is positive with p=0.35 (then
    one or more of its images are); ``with_unknown`` records without ground truth."""
    rng = random.Random(seed)
    recs = []
    for p in range(n_patients):
        positive = rng.random() < 0.35
        for j in range(rng.randint(1, 4)):
            label = positive and (j == 0 or rng.random() < 0.5)
            recs.append(Record(f"P{p}_{j}", Path(f"{p}_{j}.png"), Path("m.png"), label, f"P{p}"))
    for u in range(with_unknown):
        recs.append(Record(f"u{u}", Path(f"u{u}.png"), None, None, None))
    return recs


def _check_folds(recs, folds, k):
    """The invariants every fold assignment must hold; returns per-fold stats."""
    # every image in exactly one validation fold
    assert sorted(folds) == sorted(r.id for r in recs)
    assert set(folds.values()) == set(range(k))
    # no patient in two validation folds
    by_patient = defaultdict(set)
    for r in recs:
        if r.patient_id:
            by_patient[r.patient_id].add(folds[r.id])
    assert all(len(f) == 1 for f in by_patient.values())
    # fold_split: each fold's own images are its validation side, all others train
    for i in range(k):
        split = fold_split(folds, i)
        own = {x for x, f in folds.items() if f == i}
        assert {x for x, s in split.items() if s == "val"} == own
        assert set(split.values()) == {"train", "val"}


def _group_stratum(recs):
    groups = defaultdict(list)
    for r in recs:
        groups[r.patient_id or r.id].append(r)
    stratum = {}
    for members in groups.values():
        labels = [m.has_pneumothorax for m in members]
        s = 1 if any(v is True for v in labels) else (2 if all(v is None for v in labels) else 0)
        for m in members:
            stratum[m.id] = s
    return groups, stratum


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_grouped_and_stratified(k):
    recs = _patients(80, seed=k, with_unknown=7)
    folds = make_folds(recs, k, seed=11)
    _check_folds(recs, folds, k)
    groups, stratum = _group_stratum(recs)
    biggest = max(len(g) for g in groups.values())
    for s in (0, 1, 2):
        ids = [i for i in folds if stratum[i] == s]
        per_fold = Counter(folds[i] for i in ids)
        for f in range(k):
            # each fold's share of a stratum: the even share, within one group
            assert abs(per_fold[f] - len(ids) / k) <= biggest, (s, f, per_fold)
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 2 * biggest


def test_folds_are_deterministic_by_seed_and_order_free():
    recs = _patients(50, seed=3)
    a = make_folds(recs, 5, seed=1)
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    assert make_folds(shuffled, 5, seed=1) == a
    assert make_folds(recs, 5, seed=1) == a
    assert make_folds(recs, 5, seed=2) != a


def test_folds_of_single_images_are_exactly_balanced():
    recs = [Record(f"r{i}", Path(f"{i}.png"), Path("m.png"), i < 43) for i in range(108)]
    folds = make_folds(recs, 3, seed=42)
    _check_folds(recs, folds, 3)
    pos = Counter(folds[r.id] for r in recs if r.has_pneumothorax)
    assert sorted(pos.values()) == [14, 14, 15]  # 43 = 14 + 14 + 15
    assert sorted(Counter(folds.values()).values()) == [36, 36, 36]


def test_folds_on_the_real_sample(sample_dir):
    recs, _ = load_records(sample_dir, "png")
    for k in (3, 5):
        folds = make_folds(recs, k, seed=42)
        _check_folds(recs, folds, k)
        n_pos = sum(bool(r.has_pneumothorax) for r in recs)
        pos = Counter(folds[r.id] for r in recs if r.has_pneumothorax)
        sizes = Counter(folds.values())
        for f in range(k):
            assert abs(pos[f] - n_pos / k) < 1  # images are their own groups: exact
            assert abs(sizes[f] - len(recs) / k) < 1 + 1e-9


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=40),
    labels=st.lists(st.sampled_from([True, False, None]), min_size=40, max_size=40),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_fold_invariants_hold_for_any_grouping(sizes, labels, k, seed):
    recs = []
    for p, n in enumerate(sizes):
        for j in range(n):
            lab = labels[(p + j) % len(labels)]
            pid = f"P{p}" if n > 1 or p % 2 else None  # some images without a patient id
            recs.append(Record(f"{p}_{j}", Path("x.png"), None if lab is None else Path("m"),
                               lab, pid))
    n_groups = len({r.patient_id or r.id for r in recs})
    if n_groups < k:
        with pytest.raises(DataError, match=f"cannot make {k} folds from {n_groups}"):
            make_folds(recs, k, seed)
        return
    _check_folds(recs, make_folds(recs, k, seed), k)


def test_fold_errors():
    recs = _patients(3, seed=0)
    with pytest.raises(DataError, match="cannot make 4 folds from 3 patients/images"):
        make_folds(recs, 4)
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        make_folds(recs, 1)
    with pytest.raises(DataError, match="duplicate"):
        make_folds(recs + recs[:1], 2)
    with pytest.raises(ValueError, match="fold 3 has no image"):
        fold_split(make_folds(recs, 2), 3)


# ---------------------------------------------------------------------------------------------
# split files


def _recs(n=6, patients=False):
    return [
        Record(f"r{i}", Path(f"{i}.png"), Path("m.png"), i % 2 == 0,
               f"P{i // 2}" if patients else None)
        for i in range(n)
    ]


def _write(tmp_path, text, name="split.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_split_file_with_folds(tmp_path):
    path = _write(tmp_path, "\ufeffID,Fold,note\nr0,0,a\nr1,1,\n\nr2,2,x\nr3,0,\nr4,1,\nr5,2,\n")
    sf = read_split_file(path)
    assert sf.kind == "fold" and sf.k == 3
    assert sf.assignment == {"r0": 0, "r1": 1, "r2": 2, "r3": 0, "r4": 1, "r5": 2}
    assert sf.lines["r2"] == 5  # the blank line counts, as in an editor
    assert check_split_file(sf, _recs()) == sf.assignment


def test_split_file_with_train_val(tmp_path):
    path = _write(tmp_path, "id,split\r\nr0,train\r\nr1,VAL\r\nr2,train\r\n")
    sf = read_split_file(path)
    assert sf.kind == "split" and sf.k is None
    assert sf.assignment == {"r0": "train", "r1": "val", "r2": "train"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,fold\nr0,0\n", "expected columns id,fold or id,split (found name,fold)"),
        ("id,fold,split\nr0,0,val\n", "expected columns id,fold or id,split (both fold and "),
        ("id,fold\nr0,0\nr1,x\n", "line 3: fold must be an integer >= 0, got 'x'"),
        ("id,fold\nr0,0\nr1,-1\n", "line 3: fold must be an integer >= 0, got '-1'"),
        ("id,fold\nr0,0\nr1,1.0\n", "line 3: fold must be an integer >= 0, got '1.0'"),
        ("id,fold\nr0,0\nr1,\n", "line 3: fold must be an integer >= 0, got ''"),
        ("id,split\nr0,train\nr1,test\n", "line 3: split must be train or val, got 'test'"),
        ("id,fold\nr0,0\nr1,1\nr0,1\n", "line 4: duplicate id 'r0' (also on line 2)"),
        ("id,fold\n,0\n", "line 2: empty id"),
        ("id,fold\nr0,0\nr1,2\n", "fold 1 has no image (folds are numbered 0..K-1, all used; "
         "found 0, 2)"),
        ("id,fold\nr0,0\nr1,0\n", "only one fold (0): cross-validation needs at least 2"),
        ("id,split\nr0,train\nr1,train\n", "no image in the val split"),
        ("id,fold\n", "no rows"),
    ],
)
def test_bad_split_files_are_one_line_errors(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as exc:
        read_split_file(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_split_file_against_the_dataset(tmp_path):
    path = _write(tmp_path, "id,fold\nr0,0\nr1,1\nzz,0\nr2,1\n")
    with pytest.raises(DataError) as exc:
        check_split_file(read_split_file(path), _recs(3))
    assert str(exc.value) == f"{path}: line 4: unknown id 'zz' (not in the dataset)"
    path = _write(tmp_path, "id,fold\nr0,0\nr1,1\n")
    with pytest.raises(DataError) as exc:
        check_split_file(read_split_file(path), _recs(4))
    assert str(exc.value) == (
        f"{path}: 2 dataset image(s) have no row (e.g. 'r2'); every image needs a fold"
    )
    with pytest.raises(DataError, match="file not found"):
        read_split_file(tmp_path / "missing.csv")


def test_split_file_splitting_a_patient_warns(tmp_path):
    path = _write(tmp_path, "id,fold\nr0,0\nr1,1\nr2,1\nr3,1\n")  # patient P0 = r0, r1
    with pytest.warns(UserWarning, match="1 patient\\(s\\) have images in different folds "
                      "\\(e.g. 'P0'\\)"):
        check_split_file(read_split_file(path), _recs(4, patients=True))
