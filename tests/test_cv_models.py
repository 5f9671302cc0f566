"""A CV folder (and any list of models) in tune, evaluate and predict: out-of-fold tuning
against a hand computation, ensemble probabilities equal to the mean of the members', the
members recorded, and probability maps from which predict's masks are redone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ptxseg.cli import main
from ptxseg.cv import CVManifest, write_manifest
from ptxseg.data.folds import fold_split, make_folds
from ptxseg.data.resize import probs_to_native
from ptxseg.data.sources import load_records
from ptxseg.data.split import write_split
from ptxseg.postprocess import PostParams, area_scale, binarize, load_params, params_from_dict
from ptxseg.predictor import Predictor
from ptxseg.run import Run
from ptxseg.tune import THRESHOLDS, areas_for
from tests.conftest import make_run
from tests.test_cv import _reference_pooled_iou

SIZE = 64
K = 3


@pytest.fixture(scope="module")
def cv(tmp_path_factory, synth_data):
    """A CV folder built by hand on the 16 synthetic images: 3 folds of make_folds, each a run
    folder with a random (seeded) model, its fold's split.csv and the dataset record."""
    root = tmp_path_factory.mktemp("cv") / "cv"
    records, _ = load_records(synth_data)
    folds = make_folds(records, K, 0)
    models = []
    for i in range(K):
        run = root / f"fold-{i}"
        models.append(make_run(run, decisive=False, seed=10 + i))
        write_split(run / "split.csv", records, fold_split(folds, i))
        Run(run).write_info({"root": str(synth_data), "layout": "png", "rle": None})
    write_manifest(root, CVManifest(K, 0, folds))
    return {"root": root, "models": models, "folds": folds, "records": records}


def _gray(path):
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _probs(model, gray, tta="none"):
    """The model's probabilities of one image at model size, computed directly."""
    x = torch.from_numpy(cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                         if gray.shape != (SIZE, SIZE) else gray)[None, None]  # fmt: skip
    with torch.no_grad():
        p = torch.sigmoid(model(x))
        if tta == "hflip":
            p = 0.5 * (p + torch.sigmoid(model(x.flip(3))).flip(3))
    return p[0, 0].numpy()


def _run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_out_of_fold_tune_equals_a_hand_computation(cv, capsys):
    """`ptxseg tune CV`: every image predicted by the fold that validated on it, the grid
    searched over all of them pooled; each fold's pooled IoU under the chosen rule recorded."""
    _run(capsys, "tune", cv["root"], "--batch-size", 1, "--device", "cpu")
    saved = json.loads((cv["root"] / "thresholds.json").read_text())
    areas = areas_for(SIZE)
    maps, masks, per_fold = [], [], []
    for i, model in enumerate(cv["models"]):
        val = [r for r in cv["records"] if cv["folds"][r.id] == i]
        fold_maps = [_probs(model, _gray(r.image)) for r in val]
        fold_masks = [(_gray(r.mask) > 0).astype(np.uint8) for r in val]
        maps += fold_maps
        masks += fold_masks
        per_fold.append((fold_maps, fold_masks))
    scores = np.array([[_reference_pooled_iou(maps, masks, t, a) for a in areas]
                       for t in THRESHOLDS])  # fmt: skip
    ti, ai = np.unravel_index(int(np.argmax(scores)), scores.shape)  # first on ties
    assert (saved["binary_threshold"], saved["removal_area"]) == (THRESHOLDS[ti], areas[ai])
    assert saved["score"] == pytest.approx(scores[ti, ai], abs=1e-9)
    assert saved["n_images"] == len(cv["records"]) and saved["size"] == SIZE
    folds = saved["out_of_fold"]["folds"]
    assert [f["run"] for f in folds] == ["fold-0", "fold-1", "fold-2"]
    for f, (fold_maps, fold_masks) in zip(folds, per_fold, strict=True):
        assert f["n_images"] == len(fold_maps)
        expected = _reference_pooled_iou(fold_maps, fold_masks, THRESHOLDS[ti], areas[ai])
        assert f["pooled_iou"] == pytest.approx(expected, abs=1e-9)
    # out of fold: not what one fold's model scores on all the images
    all_masks = [(_gray(r.mask) > 0).astype(np.uint8) for r in cv["records"]]
    alone = [_probs(cv["models"][0], _gray(r.image)) for r in cv["records"]]
    alone_scores = [[_reference_pooled_iou(alone, all_masks, t, a) for a in areas]
                    for t in THRESHOLDS]  # fmt: skip
    assert not np.allclose(alone_scores, scores)


def test_an_untrained_fold_is_named(cv, tmp_path, synth_data, capsys):
    import shutil

    broken = tmp_path / "cv"
    shutil.copytree(cv["root"], broken)
    (broken / "fold-1" / "best.ckpt").unlink()
    for args in (["tune", broken], ["predict", broken, synth_data, "--out", tmp_path / "o"]):
        code = main(list(map(str, args)))
        err = capsys.readouterr().err
        assert code == 2 and f"{broken / 'fold-1'}: fold 1 of {broken} is not trained" in err
        assert "--fold 1" in err
    assert not (tmp_path / "o").exists()


def test_a_fold_trained_on_another_split_is_refused_before_its_model_loads(
    cv, tmp_path, monkeypatch, capsys
):
    """fold-2's split.csv is fold 0's: tune names the file, and no model was loaded (the
    folds are checked before any model loads)."""
    import shutil

    broken = tmp_path / "cv"
    shutil.copytree(cv["root"], broken)
    shutil.copy(broken / "fold-0" / "split.csv", broken / "fold-2" / "split.csv")
    loaded = []
    real = Predictor.from_run.__func__

    def counting(cls, run, **kwargs):
        loaded.append(Path(run.path if hasattr(run, "path") else run).name)
        return real(cls, run, **kwargs)

    monkeypatch.setattr(Predictor, "from_run", classmethod(counting))
    thresholds = broken / "thresholds.json"
    before = thresholds.read_bytes() if thresholds.exists() else None
    assert main(["tune", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'fold-2' / 'split.csv'}: fold 2 validates on other images" in err
    assert loaded == []
    assert (thresholds.read_bytes() if thresholds.exists() else None) == before


def _foreign_fold_cases(broken: Path, synth_data: Path, images: Path, out: Path) -> list:
    return [
        ["tune", broken],
        ["evaluate", broken, "--data", synth_data, "--out", out / "ev"],
        ["predict", broken, images, "--out", out / "pr"],
        ["predict", broken / "fold-0", images, "--out", out / "pr2", "--model", broken],
    ]


def test_a_foreign_fold_is_refused_by_tune_evaluate_and_predict(
    cv, tmp_path, synth_data, images, capsys
):
    """fold-1 replaced by a run trained on other data (its own split of other images): tune
    refused it, evaluate and predict used it silently; now all three refuse, naming it, and
    write nothing."""
    import shutil

    broken = tmp_path / "cv"
    shutil.copytree(cv["root"], broken)
    shutil.rmtree(broken / "fold-1")
    other = cv["records"][:10]
    foreign = broken / "fold-1"
    make_run(foreign, decisive=False, seed=99)
    write_split(foreign / "split.csv", other,
                {r.id: ("val" if i < 3 else "train") for i, r in enumerate(other)})  # fmt: skip
    Run(foreign).write_info({"root": "/elsewhere/data", "layout": "png", "rle": None})
    for args in _foreign_fold_cases(broken, synth_data, images, tmp_path):
        assert main(list(map(str, args))) == 2, args
        err = capsys.readouterr().err
        assert err == (
            f"error: {foreign / 'split.csv'}: fold 1 validates on other images than its fold "
            f"of {broken / 'cv.json'}; was it trained for another CV folder or on other data?\n"
        ), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv"]


def test_a_fold_that_links_outside_the_cv_folder_is_refused(
    cv, tmp_path, synth_data, images, capsys
):
    """fold-1 a symlink to an exact copy of itself outside the CV folder: the names pass the
    manifest's check and the split matches, but the folder is not the CV folder's."""
    import shutil

    broken = tmp_path / "cv"
    shutil.copytree(cv["root"], broken)
    elsewhere = tmp_path / "elsewhere" / "run"
    elsewhere.parent.mkdir()
    shutil.move(broken / "fold-1", elsewhere)
    (broken / "fold-1").symlink_to(elsewhere, target_is_directory=True)
    for args in _foreign_fold_cases(broken, synth_data, images, tmp_path):
        assert main(list(map(str, args))) == 2, args
        assert capsys.readouterr().err == (
            f"error: {broken / 'fold-1'}: fold 1 of {broken} links to {elsewhere}, outside the "
            "cross-validation folder (copy the run into it instead)\n"
        ), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv", "elsewhere"]
    # a link that stays inside the CV folder is no escape either: it is another fold's run
    (broken / "fold-1").unlink()
    (broken / "fold-1").symlink_to("fold-0", target_is_directory=True)
    assert main(["tune", str(broken)]) == 2
    assert "fold-1/split.csv: fold 1 validates on other images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def images(tmp_path_factory, synth_data):
    """Four synthetic radiographs at sizes other than the model's."""
    folder = tmp_path_factory.mktemp("imgs")
    pngs = sorted((synth_data / "png_images").glob("*.png"))[:4]
    for png, (w, h) in zip(pngs, ((100, 80), (64, 64), (72, 90), (130, 130)), strict=True):
        cv2.imwrite(str(folder / png.name), cv2.resize(_gray(png), (w, h)))
    return folder


def _results(out):
    with open(out / "results.csv", newline="") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_predict_a_cv_folder_is_the_mean_of_its_folds(cv, images, tmp_path, capsys, tta):
    """The saved probability maps are the mean of the folds' probabilities (each with its
    own TTA), and predict's masks are redone from them without the model, exactly."""
    out = tmp_path / "out"
    _run(capsys, "predict", cv["root"], images, "--out", out, "--save-probs", "--tta", tta,
         "--device", "cpu", "--thresholds", _thresholds(tmp_path))  # fmt: skip
    info = json.loads((out / "predict.json").read_text())
    assert info["members"] == [str(cv["root"] / f"fold-{i}" / "best.ckpt") for i in range(K)]
    assert info["combine"] == "mean probability" and info["tta"] == tta
    assert info["probs"]["folder"] == "probs" and "float32" in info["probs"]["format"]
    params = params_from_dict(info["thresholds"])
    rows = _results(out)
    for png in sorted(images.glob("*.png")):
        saved = np.load(out / "probs" / f"{png.stem}.npy")
        assert saved.dtype == np.float32 and saved.shape == (SIZE, SIZE)
        each = [_probs(m, _gray(png), tta) for m in cv["models"]]
        np.testing.assert_allclose(saved, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
        assert np.abs(each[0] - each[1]).max() > 0.01  # the members differ
        h, w = int(rows[png.stem]["height"]), int(rows[png.stem]["width"])
        native = probs_to_native(saved, h, w)
        redone = binarize(native, params, area_scale=area_scale(params, h, w))
        mask = _gray(out / "masks" / f"{png.stem}.png")
        assert mask.shape == (h, w)
        np.testing.assert_array_equal(mask > 0, redone > 0)
        assert int(rows[png.stem]["area_px"]) == int(redone.sum())
    assert sum(int(r["area_px"]) > 0 for r in rows.values()) >= 1  # masks not all empty


def _thresholds(tmp_path):
    """A rule with a removal area, so the redone post-processing has work to do."""
    from ptxseg.postprocess import save_params

    path = tmp_path / "rule.json"
    save_params(PostParams(mode="pixel", binary_threshold=0.5, removal_area=40, size=SIZE), path)
    return path


def test_any_list_of_models_is_an_ensemble(cv, images, tmp_path, capsys):
    """--model repeated: a run folder and a checkpoint file; RUN gives the thresholds; the
    probabilities are the two members' mean; predicting without --save-probs writes none."""
    root = cv["root"]
    out = tmp_path / "out"
    _run(capsys, "predict", root / "fold-0", images, "--out", out, "--save-probs",
         "--model", root / "fold-0", "--model", root / "fold-2" / "best.ckpt",
         "--device", "cpu")  # fmt: skip
    info = json.loads((out / "predict.json").read_text())
    assert info["members"] == [str(root / "fold-0" / "best.ckpt"),
                               str(root / "fold-2" / "best.ckpt")]  # fmt: skip
    png = sorted(images.glob("*.png"))[0]
    pair = [_probs(cv["models"][i], _gray(png)) for i in (0, 2)]
    np.testing.assert_allclose(np.load(out / "probs" / f"{png.stem}.npy"),
                               np.mean(pair, axis=0), rtol=1e-5, atol=1e-6)  # fmt: skip
    # the next predict into the folder, without maps: the previous maps are cleared with it
    _run(capsys, "predict", root / "fold-0", images, "--out", out, "--device", "cpu")
    assert not list((out / "probs").glob("*.npy"))
    assert json.loads((out / "predict.json").read_text())["combine"] == "single model"
    code = main(["predict", str(root / "fold-0"), str(images), "--out", str(tmp_path / "x"),
                 "--model", str(root / "fold-1"), "--model", str(root / "fold-1")])
    assert code == 2 and "an ensemble member listed twice" in capsys.readouterr().err


def test_evaluate_a_cv_folder(cv, tmp_path, synth_data, capsys):
    """metrics.json names the members; the counts are those of the mean probability under the
    CV's out-of-fold thresholds; the images are all training images of some fold (warned)."""
    _run(capsys, "tune", cv["root"], "--device", "cpu")
    out = tmp_path / "ev"
    _, err = _run(capsys, "evaluate", cv["root"], "--data", synth_data, "--out", out, "--at",
                  "model", "--device", "cpu")  # fmt: skip
    assert f"{len(cv['records'])} of the {len(cv['records'])} images have the ids of the " \
           "folds' training images" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["members"] == [str(cv["root"] / f"fold-{i}" / "best.ckpt") for i in range(K)]
    assert m["combine"] == "mean probability" and m["checkpoint"] is None
    assert m["thresholds_source"] == str(cv["root"] / "thresholds.json")
    params = load_params(cv["root"] / "thresholds.json")
    tp = fp = fn = 0
    for r in cv["records"]:
        mean = np.mean([_probs(model, _gray(r.image)) for model in cv["models"]], axis=0)
        pred = binarize(mean, params) > 0
        gt = _gray(r.mask) > 0
        tp += int(np.sum(pred & gt))
        fp += int(np.sum(pred & ~gt))
        fn += int(np.sum(~pred & gt))
    assert (m["pooled"]["tp"], m["pooled"]["fp"], m["pooled"]["fn"]) == (tp, fp, fn)
    code = main(["evaluate", str(cv["root"]), "--data", str(synth_data), "--out",
                 str(tmp_path / "v"), "--split", "val"])  # fmt: skip
    assert code == 2 and "--split val of a CV folder" in capsys.readouterr().err


METRICS_CSV = "epoch,train_loss,val_loss,val_iou,val_dice,lr,time_s\n" + "".join(
    f"{e},{1 - 0.1 * e},{1.1 - 0.1 * e},{0.1 * e},{0.12 * e},0.001,1\n" for e in range(1, 4))


def test_tune_cv_writes_an_out_of_fold_report_and_evaluate_cv_gives_true_advice(
        cv, tmp_path, synth_data, capsys):
    """Issue 26, item 25. tune CV: the out-of-fold report (each image scored by the fold that
    validated on it, counts against a hand computation; grid heatmap, curves of every fold,
    'optimistic' for the post-processing tuned on these images) and its metrics table on the
    terminal. evaluate CV: advice a CV folder accepts (no --split val), no CV/split.csv, the
    folds' curves, the ensemble named."""
    import shutil

    from tests.conftest import parse_html_report

    root = tmp_path / "cv"
    shutil.copytree(cv["root"], root, ignore=shutil.ignore_patterns("thresholds.json"))
    for i in range(K):
        (root / f"fold-{i}" / "metrics.csv").write_text(METRICS_CSV)
    out, err = _run(capsys, "tune", root, "--device", "cpu")
    oof = root / "out_of_fold"
    assert "kaggle_dice" in out and f"the out-of-fold report {oof / 'report.html'}" in out
    m = json.loads((oof / "metrics.json").read_text())
    params = load_params(root / "thresholds.json")
    tp = fp = fn = 0
    for i, model in enumerate(cv["models"]):
        for r in (r for r in cv["records"] if cv["folds"][r.id] == i):
            pred = binarize(_probs(model, _gray(r.image)), params) > 0
            gt = cv2.resize(_gray(r.mask), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0
            tp, fp, fn = tp + int(np.sum(pred & gt)), fp + int(np.sum(pred & ~gt)), fn + int(
                np.sum(~pred & gt))
    assert (m["pooled"]["tp"], m["pooled"]["fp"], m["pooled"]["fn"]) == (tp, fp, fn)
    n = len(cv["records"])
    assert m["split"] == "out-of-fold" and m["n_tuned_ids"] == n and len(m["optimistic"]) == 1
    page = parse_html_report(oof / "report.html")
    assert f"ptxseg out-of-fold evaluation of {root}" in page["text"]
    assert f"Model: the {K} folds of {root} out of fold" in page["text"]
    assert "Optimistic scores: " in page["text"] and "No training curves" not in page["text"]
    # confusion matrix, curves, grid heatmap, and the overlay grids
    assert len(page["imgs"]) == 3 + len(list((oof / "overlays").iterdir()))
    curves = cv2.imdecode(np.frombuffer(page["imgs"][1], np.uint8), cv2.IMREAD_COLOR)
    assert curves.shape[1] > 800  # the folds' curves figure (10 in wide at 100 dpi)

    ev = tmp_path / "ev"
    _, err = _run(capsys, "evaluate", root, "--data", synth_data, "--out", ev, "--device", "cpu")
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2 and all("--split val" not in line for line in warned)
    assert f"ptxseg tune {root} ({oof / 'report.html'})" in warned[0]
    assert "the images the thresholds were tuned on" in warned[1]
    text = parse_html_report(ev / "report.html")["text"]
    assert str(root / "split.csv") not in text and "No training curves" not in text
    assert f"an ensemble of the {K} folds of the CV folder {root}" in text
    assert (ev / "training_curves.png").is_file()
