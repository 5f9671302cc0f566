"""`ptxseg train --folds K / --fold I / --split-file`: the CV folder through the command."""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict

import pytest

from ptxseg.cli import main
from ptxseg.data.folds import make_folds
from ptxseg.data.sources import load_records
from ptxseg.data.split import read_split

TINY = [
    "--set", "model.encoder=efficientnet-b0", "--set", "model.encoder_weights=null",
    "--set", "data.size=64", "--set", "data.workers=0", "--set", "train.batch_size=4",
    "--set", "train.epochs=1", "--set", "train.accelerator=cpu", "--set", "train.compile=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def patients(tmp_path_factory, synth_data):
    """The 16 synthetic pairs as a manifest CSV with patient ids: 7 patients of 1-4 images."""
    root = tmp_path_factory.mktemp("patients")
    images = sorted((synth_data / "png_images").glob("*.png"))
    sizes = [4, 1, 3, 2, 1, 3, 2]
    rows, i = [], 0
    for p, n in enumerate(sizes):
        for img in images[i:i + n]:
            rows.append([img.stem, str(img), str(synth_data / "png_masks" / img.name), f"P{p}"])
        i += n
    assert i == len(images)
    with open(root / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "image", "mask", "patient_id"], *rows])
    return root / "manifest.csv"


def _train(capsys, *args):
    code = main(["train", *args, *TINY])
    out, err = capsys.readouterr()
    return code, out, err


def test_folds_through_the_command(tmp_path, patients, capsys):
    """Every image in exactly one validation fold, no patient in two, each fold a normal run
    whose split.csv is its fold of cv.json; fold i trains on every other fold."""
    cv = tmp_path / "cv"
    code, out, err = _train(capsys, "--data", str(patients), "--out", str(cv), "--folds", "3")
    assert code == 0, err
    assert "all 3 folds trained; next: ptxseg tune" in out
    manifest = json.loads((cv / "cv.json").read_text())
    records, _ = load_records(patients)
    assert manifest["k"] == 3 and manifest["seed"] == 42 and manifest["source"] == "folds"
    assert manifest["assignment"] == make_folds(records, 3, 42)
    val_sets = []
    for i in range(3):
        run = cv / f"fold-{i}"
        assert (run / "best.ckpt").is_file() and (run / "config.yaml").is_file()
        split = read_split(run / "split.csv")
        assert set(split) == {r.id for r in records}
        val = {k for k, side in split.items() if side == "val"}
        assert val == {k for k, f in manifest["assignment"].items() if f == i}
        val_sets.append(val)
    assert sorted(i for v in val_sets for i in v) == sorted(r.id for r in records)  # each once
    folds_of = defaultdict(set)
    for r in records:
        folds_of[r.patient_id].update(i for i, v in enumerate(val_sets) if r.id in v)
    assert all(len(f) == 1 for f in folds_of.values()) and len(folds_of) == 7
    # a CV folder is not started again without --resume / --fold
    code, _, err = _train(capsys, "--data", str(patients), "--out", str(cv), "--folds", "3")
    assert code == 2 and "already holds a cross-validation; use --resume" in err


def test_one_fold_at_a_time_shares_the_manifest(tmp_path, synth_data, capsys):
    """--fold I creates cv.json when absent and reuses it when present (folds side by side);
    --resume starts a fold that has not started; the folds share their recipe."""
    cv = tmp_path / "cv"
    data = str(synth_data)
    code, _, err = _train(capsys, "--data", data, "--out", str(cv), "--fold", "1")
    assert code == 2 and "has no cv.json yet; give the number of folds with --folds K" in err
    assert not cv.exists()
    code, out, err = _train(capsys, "--data", data, "--out", str(cv), "--folds", "3",
                            "--fold", "2")  # fmt: skip
    assert code == 0, err
    assert "fold 2 of 3: 1 epoch" in out and "next:" not in out
    first = (cv / "cv.json").read_bytes()
    assert sorted(p.name for p in cv.iterdir()) == ["cv.json", "fold-2"]
    code, _, err = _train(capsys, "--data", data, "--out", str(cv), "--fold", "0",
                          "--set", "optim.lr=0.01")  # fmt: skip
    assert code == 2 and "the folds of a cross-validation share their recipe" in err
    assert "optim.lr" in err and not (cv / "fold-0").exists()
    code, _, err = _train(capsys, "--data", data, "--out", str(cv), "--fold", "0", "--resume")
    assert code == 0, err
    assert (cv / "cv.json").read_bytes() == first
    split0 = read_split(cv / "fold-0" / "split.csv")
    manifest = json.loads(first)["assignment"]
    assert split0 == {k: "val" if f == 0 else "train" for k, f in manifest.items()}
    code, _, err = _train(capsys, "--data", data, "--out", str(cv), "--fold", "3")
    assert code == 2 and f"--fold 3: {cv} has folds 0..2" in err
    code, _, err = _train(capsys, "--data", data, "--out", str(cv), "--folds", "4", "--fold", "1")
    assert code == 2 and "holds 3 folds, not --folds 4" in err


def test_split_files(tmp_path, synth_data, capsys):
    """id,fold columns make the CV's folds; id,split columns make one run's split."""
    records, _ = load_records(synth_data)
    ids = [r.id for r in records]
    folds = tmp_path / "folds.csv"
    folds.write_text("id,fold\n" + "".join(f"{k},{i % 2}\n" for i, k in enumerate(ids)))
    cv = tmp_path / "cv"
    code, _, err = _train(capsys, "--data", str(synth_data), "--out", str(cv),
                          "--split-file", str(folds), "--fold", "1")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((cv / "cv.json").read_text())
    assert manifest["k"] == 2 and manifest["seed"] is None
    assert manifest["source"] == str(folds.resolve())
    assert manifest["assignment"] == {k: i % 2 for i, k in enumerate(ids)}
    split = tmp_path / "split.csv"
    split.write_text("id,split\n" + "".join(
        f"{k},{'VAL' if i % 5 == 0 else 'train'}\n" for i, k in enumerate(ids)))  # fmt: skip
    run = tmp_path / "run"
    code, _, err = _train(capsys, "--data", str(synth_data), "--out", str(run),
                          "--split-file", str(split))  # fmt: skip
    assert code == 0, err
    assert read_split(run / "split.csv") == {
        k: "val" if i % 5 == 0 else "train" for i, k in enumerate(ids)
    }
    code, _, err = _train(capsys, "--data", str(synth_data), "--out", str(tmp_path / "x"),
                          "--split-file", str(split), "--folds", "2")  # fmt: skip
    assert code == 2 and "has id,split columns (one train/val split)" in err
    partial = tmp_path / "partial.csv"
    shutil.copy(split, partial)
    partial.write_text("\n".join(split.read_text().splitlines()[:-2]) + "\n")
    code, _, err = _train(capsys, "--data", str(synth_data), "--out", str(tmp_path / "y"),
                          "--split-file", str(partial))  # fmt: skip
    assert code == 2 and f"{partial}: 2 dataset image(s) have no row" in err
    assert not (tmp_path / "y").exists() and not (tmp_path / "x").exists()
