"""`ptxseg predict` end to end on real files: PNG (8/16-bit), JPEG, the real JPEG-compressed SIIM
DICOMs and a suffix-less 16-bit DICOM, with a corrupt and a truncated file in the folder.

Masks, areas and probabilities are checked against an independent computation (images decoded
with OpenCV / Pillow / pydicom, the network run directly, OpenCV resizing, scipy labelling), and
the Kaggle CSV against the written masks through two decoders."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from scipy import ndimage

from ptxseg.cli import main
from ptxseg.data.inputs import collect_inputs
from ptxseg.data.rle import decode
from ptxseg.overlays import PRED_RGB
from ptxseg.postprocess import DEFAULT_PARAMS, PostParams
from ptxseg.predictor import Member, Predictor, TorchModel
from tests.conftest import make_run, tiny_config, write_dicom

SIZE = 64
UID = "1.2.826.0.1.3680043.8.498.12345"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def file_probs(model, entries, *, batch_size: int, tta: str = "none") -> list:
    """``(item, probs)`` of ``(id, path)`` entries through the predictor, for a torch module or
    an ONNX Runtime model, reading in this process."""
    backend = model if hasattr(model, "session") else TorchModel(model)
    predictor = Predictor([Member(backend, SIZE)], tta=tta, batch_size=batch_size, workers=0)
    return list(predictor.file_probs(entries))


def expected_probs(model: torch.nn.Module, gray: np.ndarray, tta: str = "none") -> np.ndarray:
    """Native-size probabilities computed directly: resize (area down / linear up), network,
    sigmoid, bilinear back."""
    h, w = gray.shape
    interp = cv2.INTER_AREA if h > SIZE or w > SIZE else cv2.INTER_LINEAR
    x = torch.from_numpy(cv2.resize(gray, (SIZE, SIZE), interpolation=interp))[None, None]
    with torch.no_grad():
        p = torch.sigmoid(model(x))
        if tta == "hflip":
            p = 0.5 * (p + torch.sigmoid(model(x.flip(3))).flip(3))
    return cv2.resize(p[0, 0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR)


def rle_decode_reference(rle: str, h: int, w: int) -> np.ndarray:
    """A deliberately naive SIIM decoder (relative starts, column-major)."""
    flat = np.zeros(h * w, np.uint8)
    if rle.strip() != "-1":
        nums = [int(v) for v in rle.split()]
        pos = 0
        for start, length in zip(nums[0::2], nums[1::2], strict=True):
            pos += start
            flat[pos : pos + length] = 1
            pos += length
    return flat.reshape(w, h).T


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=0, size=SIZE))
    return run, model


@pytest.fixture(scope="module")
def mixed(sample_dir, run_dir, tmp_path_factory):
    """One predict run over a folder of every kind of input + the real DICOM folder."""
    run, model = run_dir
    root = tmp_path_factory.mktemp("mixed")
    src, out = root / "in", root / "out"
    pngs = sorted((sample_dir / "png_images").glob("*.png"))
    truth: dict[str, np.ndarray] = {}  # source name -> the gray image it holds
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    shutil.copy(pngs[0], src / "a" / "chest.png")
    truth["a/chest.png"] = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    shutil.copy(pngs[1], src / "b" / "chest.png")  # same stem, other image
    truth["b/chest.png"] = cv2.imread(str(pngs[1]), cv2.IMREAD_UNCHANGED)
    # JPEG, non-square (600 high, 500 wide)
    small = cv2.resize(truth["a/chest.png"], (500, 600), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(src / "photo.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    truth["photo.jpg"] = np.asarray(Image.open(src / "photo.jpg"))
    # 16-bit PNG whose values v*257 span the full range: read back as v exactly
    g8 = cv2.resize(truth["b/chest.png"], (300, 200), interpolation=cv2.INTER_AREA)
    g8[0, 0], g8[0, 1] = 0, 255
    cv2.imwrite(str(src / "deep16.png"), g8.astype(np.uint16) * 257)
    truth["deep16.png"] = g8
    # a suffix-less 16-bit DICOM with its own SOPInstanceUID
    d8 = cv2.resize(truth["a/chest.png"], (160, 128), interpolation=cv2.INTER_AREA)
    d8[0, 0], d8[0, 1] = 0, 255
    write_dicom(src / "SCAN0001", d8.astype(np.uint16) * 257, SOPInstanceUID=UID)
    truth["SCAN0001"] = d8
    # unreadable files, a hidden file and a non-image
    (src / "bad.png").write_bytes(b"this is not a png")
    data = pngs[2].read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 3])
    shutil.copy(pngs[3], src / ".hidden.png")
    (src / "notes.txt").write_text("not an image")
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))
    for p in dicoms:
        truth[p.name] = pydicom.dcmread(p).pixel_array.astype(np.uint8)
    sub = root / "sub.csv"
    rc, stdout, stderr = run_cli(
        ["predict", str(run), str(src), str(sample_dir / "dicom"), "--out", str(out),
         "--kaggle-csv", str(sub), "--batch-size", "1"]
    )
    return {
        "rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "src": src, "sub": sub,
        "truth": truth, "model": model, "dicoms": dicoms,
    }


def _truth_of(mixed, source: str) -> np.ndarray:
    path = Path(source)
    try:
        return mixed["truth"][path.relative_to(mixed["src"]).as_posix()]
    except ValueError:  # the real DICOMs, outside the input folder
        return mixed["truth"][path.name]


def test_unreadable_files_are_reported_and_the_rest_predicted(mixed):
    assert mixed["rc"] == 2
    all_rows = read_rows(mixed["out"] / "results.csv")
    rows = {Path(r["source"]).name: r for r in all_rows}
    for name in ("bad.png", "trunc.png"):
        assert rows[name]["status"].startswith("error: "), rows[name]
        assert rows[name]["has_pneumothorax"] == "" and rows[name]["area_px"] == ""
        assert f"{name}: " in mixed["stderr"]  # reported on stderr, naming the file
        assert not (mixed["out"] / "masks" / f"{Path(name).stem}.png").exists()
    assert "not a readable image" in rows["bad.png"]["status"]
    ok = [r for r in all_rows if r["status"] == "ok"]
    assert len(ok) == 5 + len(mixed["dicoms"])
    last = mixed["stderr"].strip().splitlines()[-1]
    assert last == (
        f"error: 2 of {len(all_rows)} files failed: 2 not predicted (unreadable); see the "
        f"status column of {mixed['out'] / 'results.csv'}"
    )


def test_ids_are_unique_in_input_order_and_skips_are_noted(mixed):
    rows = read_rows(mixed["out"] / "results.csv")
    ids = [r["id"] for r in rows]
    dicom_ids = [p.stem for p in mixed["dicoms"]]
    assert ids == [
        "SCAN0001", "chest", "chest__2", "bad", "deep16", "photo", "trunc", *dicom_ids,
    ]
    assert Path(rows[1]["source"]).parent.name == "a" and Path(rows[2]["source"]).parent.name == "b"
    assert "skipped 1 file that is not an image (notes.txt)" in mixed["stderr"]
    assert ".hidden" not in " ".join(ids)


def test_masks_areas_and_probabilities_match_an_independent_computation(mixed):
    model = mixed["model"]
    for row in read_rows(mixed["out"] / "results.csv"):
        if row["status"] != "ok":
            continue
        gray = _truth_of(mixed, row["source"])
        h, w = gray.shape
        probs = expected_probs(model, gray)
        mask = cv2.imread(str(mixed["out"] / "masks" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (h, w) and mask.dtype == np.uint8, row["id"]
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask // 255, (probs > 0.5).astype(np.uint8), row["id"])
        area = int((probs > 0.5).sum())
        assert (int(row["height"]), int(row["width"])) == (h, w)
        assert int(row["area_px"]) == area
        assert float(row["area_fraction"]) == pytest.approx(area / (h * w), abs=1e-6)
        assert float(row["max_prob"]) == pytest.approx(float(probs.max()), abs=2e-6)
        assert row["has_pneumothorax"] == str(int(area > 0))
    # the decisive test network gives masks that are neither empty nor full
    fractions = [float(r["area_fraction"]) for r in read_rows(mixed["out"] / "results.csv")
                 if r["status"] == "ok"]
    assert 0.05 < min(fractions) and max(fractions) < 0.95


def test_overlays_tint_and_outline_the_predicted_region(mixed):
    row = read_rows(mixed["out"] / "results.csv")[1]  # a/chest.png, 1024 x 1024
    gray = _truth_of(mixed, row["source"])
    mask = cv2.imread(str(mixed["out"] / "masks" / f"{row['id']}.png"), 0) // 255
    ov = cv2.imread(str(mixed["out"] / "overlays" / f"{row['id']}.png"), cv2.IMREAD_COLOR)
    h = gray.shape[0]
    assert ov.shape[0] > h and ov.shape[1:] == (gray.shape[1], 3)  # a caption bar under it
    bar, ov = ov[h:], ov[:h]
    assert (bar == 255).all(axis=2).any()  # white caption text
    kernel = np.ones((15, 15), np.uint8)  # beyond the outline band and its halo
    # (the outline also runs along the image's edge where the region touches it)
    inside = cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    outside = ~cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool)
    assert inside.sum() > 1000 and outside.sum() > 1000
    for c in range(3):  # untouched away from the region
        np.testing.assert_array_equal(ov[..., c][outside], gray[outside])
    b, g, r = (ov[..., c][inside].astype(int) for c in range(3))
    assert (r > g).all() and (g > b).all()  # tinted vermillion inside
    edge = mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    outline = np.all(ov[edge] == PRED_RGB[::-1], axis=1)
    assert outline.mean() > 0.95  # an opaque outline on the border of the region
    for rr in read_rows(mixed["out"] / "results.csv"):
        assert (mixed["out"] / "overlays" / f"{rr['id']}.png").exists() == (rr["status"] == "ok")


def test_kaggle_csv_round_trips_to_the_written_masks(mixed):
    results = [r for r in read_rows(mixed["out"] / "results.csv") if r["status"] == "ok"]
    with open(mixed["sub"], newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["ImageId", "EncodedPixels"]
        sub = list(reader)
    assert len(sub) == len(results)  # unreadable files have no row
    expected_ids = []
    for r in results:
        if r["id"] == "SCAN0001":
            expected_ids.append(UID)  # from the header, not the file name
        elif r["source"].endswith(".dcm"):
            header = pydicom.dcmread(r["source"], stop_before_pixels=True)
            expected_ids.append(header.SOPInstanceUID)
        else:
            expected_ids.append(r["id"])
    assert [s[0] for s in sub] == expected_ids
    for (_, rle), r in zip(sub, results, strict=True):
        h, w = int(r["height"]), int(r["width"])
        mask = cv2.imread(str(mixed["out"] / "masks" / f"{r['id']}.png"), 0) // 255
        np.testing.assert_array_equal(decode(rle, h, w), mask)
        np.testing.assert_array_equal(rle_decode_reference(rle, h, w), mask)
        assert (rle == "-1") == (r["has_pneumothorax"] == "0")


def test_predict_json_and_summary(mixed):
    info = json.loads((mixed["out"] / "predict.json").read_text())
    assert info["thresholds_source"].endswith("thresholds.json")
    assert info["thresholds"]["binary_threshold"] == 0.5
    assert info["images"] == 7 + len(mixed["dicoms"]) and info["errors"] == 2
    assert info["input_size"] == SIZE and info["tta"] == "none"
    assert f"{5 + len(mixed['dicoms'])} images predicted" in mixed["stdout"]
    assert not list(mixed["out"].rglob(".*.tmp"))  # no temp files left behind
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    for path in (mixed["out"] / "results.csv", mixed["out"] / "masks" / "chest.png"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_removal_area_is_scaled_to_native_size(run_dir, sample_dir, tmp_path):
    """removal_area counts model pixels: at 1024 px a component must be 256x larger."""
    run, model = run_dir
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    gray = cv2.imread(str(png), 0)
    thr = tmp_path / "t.json"
    thr.write_text(json.dumps({"binary_threshold": 0.5, "removal_area": 12, "size": SIZE}))
    rc, _, err = run_cli(["predict", str(run), str(png), "--out", str(tmp_path / "o"),
                          "--thresholds", str(thr), "--batch-size", "1", "--workers", "0",
                          "--no-overlays"])
    assert rc == 0, err
    raw = expected_probs(model, gray) > 0.5
    labels, n = ndimage.label(raw, structure=np.ones((3, 3)))
    sizes = ndimage.sum(raw, labels, range(1, n + 1))
    min_px = 12 * gray.size / SIZE**2
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= min_px))
    assert (sizes < min_px).any() and (sizes >= min_px).any()  # the rule bites both ways
    mask = cv2.imread(str(tmp_path / "o" / "masks" / f"{png.stem}.png"), 0) // 255
    np.testing.assert_array_equal(mask, keep.astype(np.uint8))
    assert not (tmp_path / "o" / "overlays").exists()


def test_missing_thresholds_warns_and_uses_the_default_rule(sample_dir, tmp_path):
    run = tmp_path / "run"
    model = make_run(run)  # no thresholds.json
    img = tmp_path / "x.png"
    gray = cv2.resize(cv2.imread(str(sorted((sample_dir / "png_images").glob("*.png"))[0]), 0),
                      (96, 128))
    cv2.imwrite(str(img), gray)
    rc, _, err = run_cli(["predict", str(run), str(img), "--out", str(tmp_path / "o"),
                          "--workers", "0", "--batch-size", "1"])
    assert rc == 0
    assert "warning:" in err and "thresholds.json not found" in err and "probs > 0.5" in err
    info = json.loads((tmp_path / "o" / "predict.json").read_text())
    assert info["thresholds_source"] == "default"
    assert info["thresholds"] == {"binary_threshold": 0.5, "removal_area": 0, "mode": "pixel",
                                  "size": None}
    mask = cv2.imread(str(tmp_path / "o" / "masks" / "x.png"), 0) // 255
    np.testing.assert_array_equal(mask, (expected_probs(model, gray) > 0.5).astype(np.uint8))
    # an explicit --thresholds file that does not exist is an error, before any output
    rc, _, err = run_cli(["predict", str(run), str(img), "--out", str(tmp_path / "o2"),
                          "--thresholds", str(tmp_path / "nope.json")])
    assert rc == 2 and "nope.json: thresholds file not found" in err
    assert not (tmp_path / "o2").exists()


class NotWeights:
    """Anything that is not a tensor: refused by weights_only=True loading."""


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("problem", ["wrong-architecture", "truncated", "pickled-object"])
def test_bad_checkpoint_is_a_one_line_error(problem, tmp_path):
    from ptxseg.checkpoint import save_model_checkpoint
    from ptxseg.config import save_config
    from ptxseg.model import build_model

    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(), run / "config.yaml")
    ckpt = run / "best.ckpt"
    if problem == "wrong-architecture":
        other = build_model(tiny_config(**{"model.encoder": "resnet18"}).model, pretrained=False)
        save_model_checkpoint(other, ckpt)
        expected = "does not match the config"
    elif problem == "truncated":
        save_model_checkpoint(build_model(tiny_config().model, pretrained=False), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:50_000])
        expected = "truncated or not a checkpoint"
    else:
        torch.save({"state_dict": {"model.x": torch.zeros(1)}, "extra": NotWeights()}, ckpt)
        expected = "refusing to load"
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((40, 40), 128, np.uint8))
    rc, _, err = run_cli(["predict", str(run), str(img), "--out", str(tmp_path / "o")])
    assert rc == 2
    line = _one_line_error(err)
    assert str(ckpt) in line and expected in line, line
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_input_is_a_one_line_error(tmp_path):
    rc, _, err = run_cli(["predict", str(tmp_path / "run"), str(tmp_path / "nope.png"),
                          "--out", str(tmp_path / "o")])
    assert rc == 2
    assert _one_line_error(err) == f"error: {tmp_path / 'nope.png'}: no such file or folder"


def test_overlays_of_negatives_keep_the_radiograph_and_large_images_are_capped(tmp_path):
    """predict's overlay (finish): a negative is the radiograph with a caption bar under it; a
    large image is shrunk to OVERLAY_MAX_SIDE, its prediction tinted vermillion."""
    from ptxseg.data.dataset import Item
    from ptxseg.image_outputs import OVERLAY_MAX_SIDE, Post, finish

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    post = Post(DEFAULT_PARAMS, tmp_path, overlays=True, kaggle=False)
    item = Item(0, "neg", str(tmp_path / "neg.png"), 300, 200, image=img)
    result = finish(item, np.zeros((SIZE, SIZE), np.float32), post)
    assert result.measures.area_px == 0 and result.measures.side == "none"
    ov = cv2.imread(str(tmp_path / "overlays" / "neg.png"), cv2.IMREAD_COLOR)
    assert ov.shape[0] > 300 and ov.shape[1] == 200
    for c in range(3):
        np.testing.assert_array_equal(ov[:300, :, c], img)
    big = rng.integers(0, 256, (2500, 3000), dtype=np.uint8)
    probs = np.zeros((SIZE, SIZE), np.float32)
    probs[26:38, 21:43] = 1.0  # rows 1016-1484, columns 984-2016 at native size
    item = Item(1, "big", str(tmp_path / "big.png"), 2500, 3000, image=big)
    finish(item, probs, post)
    ov = cv2.imread(str(tmp_path / "overlays" / "big.png"), cv2.IMREAD_COLOR)
    assert ov.shape[1] == OVERLAY_MAX_SIDE and ov.shape[0] > round(2500 * OVERLAY_MAX_SIDE / 3000)
    centre = ov[round(1250 / 3000 * 1024), round(1500 / 3000 * 1024)].astype(int)
    assert centre[2] > centre[1] > centre[0]  # tinted vermillion inside the box (BGR)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tta", "vflip", "--tta: unknown 'vflip' (valid: none, hflip)"),
        ("--backend", "tensorrt", "--backend: unknown 'tensorrt' (valid: torch, onnx)"),
    ],
)
def test_bad_options_fail_before_anything_is_written(run_dir, tmp_path, option, value, message):
    run, _ = run_dir
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((40, 40), 128, np.uint8))
    rc, _, err = run_cli(["predict", str(run), str(img), "--out", str(tmp_path / "o"),
                          option, value])
    assert rc == 2 and _one_line_error(err) == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_images_in_flight_are_bounded(tmp_path, monkeypatch):
    """Streaming: with slow writers, the number of predicted-but-unwritten images stays under
    the pipeline's bound instead of growing with the number of inputs."""
    import threading
    import time

    import ptxseg.predict as P

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(80):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((16, 16), i, np.uint8))
    lock = threading.Lock()
    state = {"alive": 0, "max": 0}

    class Fake:
        device = "cpu"

        def probs(self, x, tta="none"):
            with lock:
                state["alive"] += len(x)
                state["max"] = max(state["max"], state["alive"])
            return np.full((len(x), 32, 32), 0.7, np.float32)

    original = P.finish

    def slow_finish(item, probs, post):
        time.sleep(0.01)
        result = original(item, probs, post)
        with lock:
            state["alive"] -= 1
        return result

    monkeypatch.setattr(P, "finish", slow_finish)
    predictor = Predictor([Member(Fake(), 32)], batch_size=2, workers=0)
    inputs = collect_inputs([folder])
    counts, _ = P.run_prediction(predictor, inputs, tmp_path / "out", DEFAULT_PARAMS,
                                 writers=2, progress=False)
    assert counts.errors == [] and counts.positive == counts.predicted == 80
    assert state["alive"] == 0
    bound = (2 * 2 + 2 * 2) + 2  # max_in_flight (2 * batch + 2 * writers) + the batch in hand
    assert 2 < state["max"] <= bound
    assert len(read_rows(tmp_path / "out" / "results.csv")) == 80
