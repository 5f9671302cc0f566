"""`ptxseg tune` then `ptxseg evaluate` on a run trained in the tests, on the real SIIM sample
(png layout) and on a PTX-498-layout folder built from it; determinism and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import confusion_matrix

from ptxseg.cli import main
from ptxseg.postprocess import PostParams, load_params
from tests.conftest import make_run, parse_html_report, synth_dataset

METRIC_LAYOUT = {
    "pooled": ["accuracy", "recall", "precision", "f1", "iou", "tn", "fp", "fn", "tp"],
    "per_image": ["kaggle_dice", "dice_positive_mean", "iou_positive_mean"],
    "detection": ["sensitivity", "specificity", "auc"],
}


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the trained tiny run (tune writes into it)."""
    dst = tmp_path_factory.mktemp("eval_run") / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def tuned(run, synth_data) -> Path:
    assert main(["tune", str(run), "--data", str(synth_data)]) == 0
    return run


@pytest.fixture(scope="module")
def data96(tmp_path_factory) -> Path:
    """Synthetic 96 px images: native resolution differs from the model's 64 px."""
    return synth_dataset(tmp_path_factory, n=8, size=96, seed=3)


@pytest.fixture(scope="module")
def evaluated(tuned, data96, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ev") / "out"
    assert main(["evaluate", str(tuned), "--data", str(data96), "--out", str(out)]) == 0
    return out


def _read_per_image(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _masks(data: Path) -> dict[str, np.ndarray]:
    return {
        p.stem: (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        for p in sorted((data / "png_masks").glob("*.png"))
    }


def test_tune_writes_thresholds(tuned, synth_data):
    obj = json.loads((tuned / "thresholds.json").read_text())
    assert list(obj)[:2] == ["binary_threshold", "removal_area"]
    assert obj["mode"] == "pixel" and obj["objective"] == "iou" and obj["size"] == 64
    with (tuned / "split.csv").open() as fh:
        n_val = sum(1 for row in csv.DictReader(fh) if row["split"] == "val")
    assert obj["n_images"] == n_val > 0
    rows = obj["grid"]["rows"]
    assert len(rows) == 23 * 6
    # removal areas: 0..4096 px of a 512 px input as the same fractions of the 64 px input
    assert sorted({r[1] for r in rows}) == [a * 64 * 64 // (512 * 512) for a in
                                            (0, 256, 512, 1024, 2048, 4096)]
    best = max(r[2] for r in rows)
    assert obj["score"] == pytest.approx(best, abs=1e-6)
    chosen = [r for r in rows if r[0] == obj["binary_threshold"] and r[1] == obj["removal_area"]]
    assert chosen[0][2] == pytest.approx(best, abs=1e-6)
    assert load_params(tuned / "thresholds.json").binary_threshold == obj["binary_threshold"]


def test_evaluate_writes_every_file(evaluated, tuned, data96):
    names = {p.name for p in evaluated.iterdir()}
    assert names >= {"metrics.json", "per_image.csv", "confusion_matrix.png", "report.html"}
    overlays = sorted(p.name for p in (evaluated / "overlays").iterdir())
    assert "random.png" in overlays and set(overlays) <= {"best.png", "worst.png", "random.png"}
    m = json.loads((evaluated / "metrics.json").read_text())
    head = ["n_images", "n_positive", "pooled", "per_image", "detection", "confidence_intervals",
            "thresholds"]
    assert list(m)[:7] == head
    for section, keys in METRIC_LAYOUT.items():
        assert list(m[section])[: len(keys)] == keys
    masks = _masks(data96)
    assert m["n_images"] == len(masks) == 8
    assert m["n_positive"] == sum(int(g.any()) for g in masks.values()) == 4
    assert m["compared_at"] == "native"
    assert m["thresholds"] == load_params(tuned / "thresholds.json").to_dict()
    pooled = m["pooled"]
    assert pooled["tn"] + pooled["fp"] + pooled["fn"] + pooled["tp"] == 8 * 96 * 96  # native
    rows = _read_per_image(evaluated / "per_image.csv")
    assert [r["id"] for r in rows] == sorted(masks)
    for r in rows:
        assert int(r["true_area"]) == int(masks[r["id"]].sum())
        assert int(r["has_pneumothorax"]) == int(masks[r["id"]].any())
    assert sum(int(r["tp"]) for r in rows) == pooled["tp"]
    assert sum(int(r["predicted_area"]) for r in rows) == pooled["tp"] + pooled["fp"]
    for png in ["confusion_matrix.png", *(f"overlays/{n}" for n in overlays)]:
        img = cv2.imread(str(evaluated / png))
        assert img is not None and img.shape[0] > 200 and img.std() > 5
    page = parse_html_report(evaluated / "report.html")
    # confusion matrix, training curves (the run has metrics.csv), grid heatmap, overlays
    assert len(page["imgs"]) == 3 + len(overlays)
    for data in page["imgs"]:
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert f"{pooled['tp']:,}" in page["text"] and rows[0]["id"] in page["text"]
    assert (evaluated / "training_curves.png").exists()


def _pixel_rule_by_hand(probs: np.ndarray, params, scale: float) -> np.ndarray:
    """The pixel rule written out without ptxseg: ``probs > threshold``, then the 8-connected
    components (scipy) with fewer than ``removal_area * scale`` pixels removed."""
    assert params.mode == "pixel"
    labels, _ = ndimage.label(probs > params.binary_threshold, structure=np.ones((3, 3)))
    keep = np.bincount(labels.ravel()) >= params.removal_area * scale
    keep[0] = False
    return keep[labels].astype(np.uint8)


def _independent_counts(
    run: Path, params, data: Path, scale: float = (96 * 96) / (64 * 64)
) -> dict[str, tuple[int, int, int, float]]:
    """Per image (tp, fp, fn, max prob), none of it by ptxseg's own post-processing: the
    model run by hand on the image resized to 64 px (OpenCV), probabilities resized back to
    96 px (OpenCV, bilinear), the rule written out with areas scaled by 96^2 / 64^2
    (:func:`_pixel_rule_by_hand`), and scikit-learn's confusion matrix."""
    import torch

    from ptxseg.run import Run

    model, _ = Run(run).load_model()
    out = {}
    for ident, gt in _masks(data).items():
        img = cv2.imread(str(data / "png_images" / f"{ident}.png"), cv2.IMREAD_GRAYSCALE)
        x = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
        with torch.no_grad():
            probs = torch.sigmoid(model(torch.from_numpy(x)[None, None])).numpy()[0, 0]
        native = cv2.resize(probs, (96, 96), interpolation=cv2.INTER_LINEAR)
        pred = _pixel_rule_by_hand(native, params, scale)
        tn, fp, fn, tp = confusion_matrix(gt.ravel(), pred.ravel(), labels=[0, 1]).ravel()
        out[ident] = (int(tp), int(fp), int(fn), float(probs.max()))
    return out


def _check_against_independent(out: Path, run: Path, params, data: Path) -> None:
    expected = _independent_counts(run, params, data)
    rows = {r["id"]: r for r in _read_per_image(out / "per_image.csv")}
    assert sorted(rows) == sorted(expected)
    for ident, (tp, fp, fn, max_prob) in expected.items():
        r = rows[ident]
        assert (int(r["tp"]), int(r["fp"]), int(r["fn"])) == (tp, fp, fn), ident
        assert float(r["max_prob"]) == pytest.approx(max_prob, abs=1e-5)
    m = json.loads((out / "metrics.json").read_text())
    tp, fp, fn = (sum(v[i] for v in expected.values()) for i in range(3))
    assert (m["pooled"]["tp"], m["pooled"]["fp"], m["pooled"]["fn"]) == (tp, fp, fn)
    y = np.concatenate([g.ravel() for g in _masks(data).values()])
    assert m["pooled"]["accuracy"] == pytest.approx(1 - (fp + fn) / y.size, abs=1e-12)
    if tp + fp + fn:
        assert m["pooled"]["iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)


def test_evaluate_counts_match_an_independent_computation(tuned, data96, evaluated):
    _check_against_independent(evaluated, tuned, load_params(tuned / "thresholds.json"), data96)


def test_metrics_json_byte_identical(tuned, data96, evaluated, tmp_path):
    out = tmp_path / "again"
    assert main(["evaluate", str(tuned), "--data", str(data96), "--out", str(out)]) == 0
    assert (out / "metrics.json").read_bytes() == (evaluated / "metrics.json").read_bytes()
    assert (out / "per_image.csv").read_bytes() == (evaluated / "per_image.csv").read_bytes()


def test_evaluate_at_model_resolution(tuned, data96, tmp_path):
    out = tmp_path / "model"
    args = ["evaluate", str(tuned), "--data", str(data96), "--out", str(out), "--at", "model"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compared_at"] == "model"
    p = m["pooled"]
    assert p["tn"] + p["fp"] + p["fn"] + p["tp"] == 8 * 64 * 64
    rows = {r["id"]: r for r in _read_per_image(out / "per_image.csv")}
    for ident, gt in _masks(data96).items():  # ground truth resized with nearest neighbour
        small = cv2.resize(gt, (64, 64), interpolation=cv2.INTER_NEAREST)
        assert int(rows[ident]["true_area"]) == int(small.sum())


def test_tune_triplet_kaggle_then_evaluate(run, synth_data, data96, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run, work)
    args = ["tune", str(work), "--data", str(synth_data), "--mode", "triplet"]
    assert main([*args, "--objective", "kaggle"]) == 0
    obj = json.loads((work / "thresholds.json").read_text())
    assert obj["mode"] == "triplet" and obj["objective"] == "kaggle"
    assert obj["bottom_threshold"] <= obj["top_threshold"]
    # the area grid is scaled to the run's 64 px input: 0..4096 px of 512 px, same fractions
    assert obj["area_grid"]["areas"] == [0, 4, 8, 16, 32, 64]
    assert obj["min_area"] in obj["area_grid"]["areas"]
    assert obj["grid"]["columns"] == ["top_threshold", "min_area", "bottom_threshold", "score"]
    out = tmp_path / "out"
    assert main(["evaluate", str(work), "--data", str(data96), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["thresholds"]["mode"] == "triplet"


def test_evaluate_validation_split_only(tuned, synth_data, tmp_path):
    out = tmp_path / "val"
    args = ["evaluate", str(tuned), "--data", str(synth_data), "--out", str(out)]
    assert main([*args, "--split", "val"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == json.loads((tuned / "thresholds.json").read_text())["n_images"]
    assert m["split"] == "val"


# --------------------------------------------------------------------------- real data


def _link_pairs(sample: Path, dst: Path, names: list[str]) -> None:
    (dst / "png_images").mkdir(parents=True)
    (dst / "png_masks").mkdir()
    for name in names:
        (dst / "png_images" / name).symlink_to(sample / "png_images" / name)
        (dst / "png_masks" / name).symlink_to(sample / "png_masks" / name)


def _sample_names(sample: Path, label: int, n: int) -> list[str]:
    return sorted(p.name for p in (sample / "png_images").glob(f"*_{label}_.png"))[:n]


def test_evaluate_real_sample_png_layout(tuned, sample_dir, tmp_path):
    """A subset of the real SIIM sample (1024x1024, png layout, positives and negatives)."""
    data = tmp_path / "siim"
    names = _sample_names(sample_dir, 1, 4) + _sample_names(sample_dir, 0, 4)
    _link_pairs(sample_dir, data, names)
    out = tmp_path / "out"
    assert main(["evaluate", str(tuned), "--data", str(data), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 8 and m["n_positive"] == 4 and m["layout"] == "png"
    p = m["pooled"]
    assert p["tn"] + p["fp"] + p["fn"] + p["tp"] == 8 * 1024 * 1024
    true_px = sum(
        int((cv2.imread(str(data / "png_masks" / n), cv2.IMREAD_GRAYSCALE) > 0).sum())
        for n in _sample_names(sample_dir, 1, 4)
    )
    assert p["tp"] + p["fn"] == true_px
    assert m["detection"]["auc"] is not None and m["detection"]["specificity"] is not None
    parse_html_report(out / "report.html")


def test_evaluate_ptx498_layout_without_negatives(tuned, sample_dir, tmp_path):
    """PTX-498 folders hold positives only: specificity and AUC are null with a reason."""
    data = tmp_path / "ptx498"
    site = data / "Site1"
    site.mkdir(parents=True)
    for n, name in enumerate(_sample_names(sample_dir, 1, 3), start=1):
        shutil.copy(sample_dir / "png_images" / name, site / f"{n}.1.img.png")
        shutil.copy(sample_dir / "png_masks" / name, site / f"{n}.2.mask.png")
    out = tmp_path / "out"
    assert main(["evaluate", str(tuned), "--data", str(data), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["layout"] == "ptx498" and m["n_images"] == m["n_positive"] == 3
    assert m["detection"]["specificity"] is None and m["detection"]["auc"] is None
    assert m["reasons"]["detection.specificity"] == "no negative image"
    assert "AUC needs both classes" in m["reasons"]["detection.auc"]
    assert m["per_image"]["dice_positive_mean"] is not None
    page = parse_html_report(out / "report.html")
    assert "no negative image" in page["text"]


# --------------------------------------------------------------------------- bad input


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_run(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    assert main(["evaluate", str(missing), "--data", str(tmp_path), "--out", str(out)]) == 2
    _one_line_error(capsys, str(missing), "run folder not found")
    assert not out.exists()
    assert main(["tune", str(missing), "--data", str(tmp_path)]) == 2
    _one_line_error(capsys, "run folder not found")


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_missing_thresholds_one_rule_for_evaluate_and_predict(run, data96, tmp_path, capsys):
    """Without RUN/thresholds.json evaluate and predict both use the default rule (probs > 0.5,
    no component removal) with the same one-line warning and record thresholds_source
    "default"; an explicit --thresholds FILE that is missing is an error in both."""
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("thresholds.json"))
    expected = (
        f"warning: {bare / 'thresholds.json'} not found: using the default rule probs > 0.5, "
        f"no component removal (run `ptxseg tune {bare}` to choose them)"
    )
    default = {"binary_threshold": 0.5, "removal_area": 0, "mode": "pixel", "size": None}
    out = tmp_path / "out"
    assert main(["evaluate", str(bare), "--data", str(data96), "--out", str(out)]) == 0
    assert expected in _warnings(capsys.readouterr().err)
    m = json.loads((out / "metrics.json").read_text())
    assert m["thresholds"] == default and m["thresholds_source"] == "default"
    _check_against_independent(out, bare, PostParams(binary_threshold=0.5), data96)
    text = parse_html_report(out / "report.html")["text"]
    assert "Default rule" in text and "probs > 0.5, no component removal" in text

    images = sorted((data96 / "png_images").glob("*.png"))[:2]
    pred_out = tmp_path / "pred"
    argv = ["predict", str(bare), *map(str, images), "--out", str(pred_out), "--workers", "0"]
    assert main(argv) == 0
    assert _warnings(capsys.readouterr().err) == [expected]
    info = json.loads((pred_out / "predict.json").read_text())
    assert info["thresholds"] == default and info["thresholds_source"] == "default"

    other = tmp_path / "t.json"
    args = ["evaluate", str(bare), "--data", str(data96), "--out", str(tmp_path / "o2")]
    assert main([*args, "--thresholds", str(other)]) == 2
    _one_line_error(capsys, str(other), "thresholds file not found")
    assert main([*argv[:-4], "--out", str(tmp_path / "p2"), "--thresholds", str(other)]) == 2
    _one_line_error(capsys, str(other), "thresholds file not found")
    other.write_text("{broken")
    assert main([*args, "--thresholds", str(other)]) == 2
    _one_line_error(capsys, str(other), "not valid JSON")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "p2").exists()


def test_evaluate_warns_about_training_images(tuned, synth_data, tmp_path, capsys):
    """--split all on the run's own dataset counts the images of its training split, warns
    and points at --split val; metrics.json and report.html carry the count."""
    with (tuned / "split.csv").open() as fh:
        side = {row["id"]: row["split"] for row in csv.DictReader(fh)}
    ids = sorted(p.stem for p in (synth_data / "png_images").glob("*.png"))
    n_train = sum(1 for i in ids if side.get(i) == "train")
    assert 0 < n_train < len(ids)
    out = tmp_path / "all"
    assert main(["evaluate", str(tuned), "--data", str(synth_data), "--out", str(out)]) == 0
    line, tuned_on = _warnings(capsys.readouterr().err)  # the training and the tuned images
    assert f"{n_train} of the {len(ids)} images have the ids of the run's training images" in line
    assert str(tuned / "split.csv") in line and "--split val" in line
    assert "the images the thresholds were tuned on" in tuned_on
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_train_ids"] == n_train and m["split"] == "all"
    assert m["optimistic"] == [line.removeprefix("warning: "), tuned_on.removeprefix("warning: ")]
    text = parse_html_report(out / "report.html")["text"]
    assert f"{n_train} of the {len(ids)} images have the ids" in text and "--split val" in text
    # the validation split (whose images the thresholds were tuned on: tests/test_tune_cli.py),
    # or the same images under other ids: no training images, a count of 0
    other = tmp_path / "other"
    for sub in ("png_images", "png_masks"):
        (other / sub).mkdir(parents=True)
        for p in (synth_data / sub).iterdir():
            shutil.copy(p, other / sub / f"other_{p.name}")
    for extra, data in ((["--split", "val"], synth_data), ([], other)):
        again = tmp_path / f"o{len(extra)}"
        argv = ["evaluate", str(tuned), "--data", str(data), "--out", str(again), *extra]
        assert main(argv) == 0
        assert not any("training images" in w for w in _warnings(capsys.readouterr().err))
        assert json.loads((again / "metrics.json").read_text())["n_train_ids"] == 0
        assert "training images" not in parse_html_report(again / "report.html")["text"]


def test_max_prob_is_the_same_in_predict_and_evaluate(data96, tmp_path):
    """One image, one model: results.csv (predict) and per_image.csv (evaluate) give the same
    max_prob, the maximum of the probability map at model resolution (64 px), computed here
    by hand; the image is 96 px, so a native-resolution maximum would differ."""
    import torch

    from ptxseg.data.resize import probs_to_native

    run = tmp_path / "run"
    model = make_run(run, decisive=False, thresholds=PostParams())  # probabilities near 0.5
    ident = sorted(p.stem for p in (data96 / "png_images").glob("*.png"))[0]
    image = data96 / "png_images" / f"{ident}.png"
    gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
    x = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(x)[None, None])).numpy()[0, 0]
    expected = float(probs.max())
    native_max = float(probs_to_native(probs, 96, 96).max())
    assert round(native_max, 6) != round(expected, 6)  # the two definitions differ here

    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p"),
                 "--workers", "0"]) == 0
    [row] = _read_per_image(tmp_path / "p" / "results.csv")
    data = tmp_path / "one"
    _link_pairs(data96, data, [image.name])
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    [ev] = _read_per_image(tmp_path / "e" / "per_image.csv")
    assert row["id"] == ev["id"] == ident
    assert float(row["max_prob"]) == float(ev["max_prob"]) == round(expected, 6)


def test_tune_warns_when_the_model_finds_nothing(data96, tmp_path, capsys):
    """A network whose probabilities are ~0 everywhere: the best pooled IoU is 0, tune says
    the thresholds are not meaningful (and thresholds.json keeps the warning)."""
    import torch

    from ptxseg.checkpoint import save_model_checkpoint
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import write_split

    run = tmp_path / "run"
    model = make_run(run, decisive=False)
    with torch.no_grad():
        model.net.segmentation_head[0].bias.fill_(-40.0)
    save_model_checkpoint(model, run / "best.ckpt")
    records, _ = load_records(data96)
    write_split(run / "split.csv", records, {r.id: "val" for r in records})
    assert main(["tune", str(run), "--data", str(data96)]) == 0
    expected = (
        "warning: the model finds almost nothing on the validation split (best pooled IoU "
        "0.000); the chosen thresholds are not meaningful"
    )
    assert _warnings(capsys.readouterr().err) == [expected]
    obj = json.loads((run / "thresholds.json").read_text())
    assert obj["score"] == 0.0 and obj["warnings"] == [expected.removeprefix("warning: ")]
    out = tmp_path / "eval"  # the report shows it beside the chosen rule
    assert main(["evaluate", str(run), "--data", str(data96), "--out", str(out)]) == 0
    text = parse_html_report(out / "report.html")["text"]
    assert f"Tuning: {obj['warnings'][0]}" in text


def test_tune_uses_the_recorded_dataset(run, synth_data, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("data.json", "thresholds.json"))
    assert main(["tune", str(work)]) == 2
    _one_line_error(capsys, str(work), "does not record its dataset", "pass --data")
    (work / "data.json").write_text(json.dumps({"root": str(synth_data), "layout": "png"}))
    assert main(["tune", str(work)]) == 0
    obj = json.loads((work / "thresholds.json").read_text())
    assert obj["data"] == str(synth_data) and obj["layout"] == "png"


def test_tune_needs_a_matching_split(run, data96, tmp_path, capsys):
    other = tmp_path / "other"  # the same images under other ids than the run's
    for sub in ("png_images", "png_masks"):
        (other / sub).mkdir(parents=True)
        for p in (data96 / sub).iterdir():
            shutil.copy(p, other / sub / f"other_{p.name}")
    before = (run / "thresholds.json").read_bytes() if (run / "thresholds.json").exists() else None
    assert main(["tune", str(run), "--data", str(other)]) == 2
    _one_line_error(capsys, "are not in this dataset", "split.csv")
    after = (run / "thresholds.json").read_bytes() if (run / "thresholds.json").exists() else None
    assert before == after
    assert main(["tune", str(run), "--data", str(other), "--objective", "dice"]) == 2
    _one_line_error(capsys, "--objective", "valid: iou, kaggle")


def test_evaluate_bad_options(tuned, data96, tmp_path, capsys):
    base = ["evaluate", str(tuned), "--data", str(data96), "--out", str(tmp_path / "o")]
    assert main([*base, "--at", "half"]) == 2
    _one_line_error(capsys, "--at", "native, model")
    assert main([*base, "--tta", "rot90"]) == 2
    _one_line_error(capsys, "--tta")
    missing = ["evaluate", str(tuned), "--data", str(tmp_path / "none")]
    assert main([*missing, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "dataset not found")


def test_thresholds_from_hand_written_file(data96, tmp_path):
    """A paper-style file with only the two keys works with --thresholds; its removal area is
    taken at the run's model resolution (64 px) and scaled to the native 96 px."""
    run = tmp_path / "run"
    make_run(run)  # random network with decisive logits: masks with components of all sizes
    path = tmp_path / "paper.json"
    path.write_text('{"binary_threshold": 0.5, "removal_area": 30}')
    out = tmp_path / "o"
    args = ["evaluate", str(run), "--data", str(data96), "--out", str(out)]
    assert main([*args, "--thresholds", str(path)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    expected = {"binary_threshold": 0.5, "removal_area": 30, "mode": "pixel", "size": 64}
    assert m["thresholds"] == expected
    _check_against_independent(out, run, PostParams(**expected), data96)
    # the scaling matters here: unscaled areas would keep more pixels
    unscaled = _independent_counts(run, PostParams(**expected), data96, scale=1.0)
    assert sum(v[0] + v[1] for v in unscaled.values()) > m["pooled"]["tp"] + m["pooled"]["fp"]


def test_tune_iou_on_negative_only_validation(data96, tmp_path, capsys):
    """No positive validation image: pooled IoU is undefined, the error says what to do; the
    Kaggle objective still works (and prefers empty masks)."""
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import write_split

    run = tmp_path / "run"
    make_run(run)
    records, _ = load_records(data96)
    write_split(run / "split.csv", records, {
        r.id: "train" if r.has_pneumothorax else "val" for r in records
    })
    assert main(["tune", str(run), "--data", str(data96)]) == 2
    _one_line_error(capsys, "split.csv", "no pneumothorax", "--objective kaggle")
    assert not (run / "thresholds.json").exists()
    assert main(["tune", str(run), "--data", str(data96), "--objective", "kaggle"]) == 0
    obj = json.loads((run / "thresholds.json").read_text())
    assert obj["n_positive"] == 0 and obj["n_images"] == 4
    # on negatives an image's Dice is 1 (predicted empty) or 0: scores are multiples of 1/4
    scores = [r[-1] for r in obj["grid"]["rows"]]
    assert obj["score"] == max(scores) and all(4 * v == int(4 * v) for v in scores)
    [line] = _warnings(capsys.readouterr().err)
    assert "validation split (4 images) has no pneumothorax" in line
    assert "not meaningful" in line and obj["warnings"] == [line.removeprefix("warning: ")]


def test_a_run_trained_on_a_prepared_copy_evaluates_on_the_original(sample_dir, tmp_path):
    """prepare keeps ids: every real SIIM PNG name ends in '_' and a prepared copy used to
    drop it, so `evaluate --split val` on the original found none of the run's val ids."""
    from ptxseg.data.sources import load_records
    from tests.test_train_cli import CPU_SETS

    data = tmp_path / "siim"
    names = _sample_names(sample_dir, 1, 6) + _sample_names(sample_dir, 0, 6)
    _link_pairs(sample_dir, data, names)
    original = sorted(Path(n).stem for n in names)
    assert all(i.endswith("_") for i in original)
    copy = tmp_path / "copy"
    assert main(["prepare", str(data), str(copy), "--size", "64"]) == 0
    records, layout = load_records(copy)
    assert layout == "csv" and [r.id for r in records] == original

    run = tmp_path / "run"
    assert main(["train", "--config", "paper", "--data", str(copy), "--out", str(run),
                 *CPU_SETS, "--set", "data.val_fraction=0.34"]) == 0
    with (run / "split.csv").open() as fh:
        split = {row["id"]: row["split"] for row in csv.DictReader(fh)}
    assert sorted(split) == original
    val = sorted(i for i, side in split.items() if side == "val")
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--data", str(data), "--split", "val",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == len(val) and m["n_train_ids"] == 0
    rows = _read_per_image(out / "per_image.csv")
    assert [r["id"] for r in rows] == val
    true_px = sum(
        int((cv2.imread(str(data / "png_masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 0).sum())
        for i in val
    )
    assert m["pooled"]["tp"] + m["pooled"]["fn"] == true_px  # compared at native 1024 px
