"""`ptxseg export`: an ONNX file with a dynamic batch axis and self-describing metadata, written
only after ONNX Runtime matches PyTorch; `predict --backend onnx` gives the torch masks."""

from __future__ import annotations

import csv
import json
import re
import shutil

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ptxseg.data.imageio import read_image
from ptxseg.export import export_model
from ptxseg.onnx_runtime import OnnxModel
from ptxseg.postprocess import PostParams
from tests.conftest import make_run
from tests.test_predict import SIZE, expected_probs, file_probs, run_cli
from tests.test_predict_tta import MirrorSymmetric


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = make_run(run, thresholds=PostParams(binary_threshold=0.5, removal_area=4, size=SIZE))
    rc, out, err = run_cli(["export", str(run)])
    assert rc == 0, err
    return run, model, out


@pytest.fixture(scope="module")
def images(sample_dir):
    pngs = sorted((sample_dir / "png_images").glob("*.png"))[:5]
    return np.stack([cv2.resize(cv2.imread(str(p), 0), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                     for p in pngs])


def test_export_reports_parity_within_tolerance(exported):
    run, _, out = exported
    m = re.search(r"parity: max \|ONNX Runtime - PyTorch\| probability = (\S+) ", out)
    assert m, out
    assert float(m.group(1)) <= 1e-4
    assert f"wrote {run / 'model.onnx'}" in out


def test_onnx_graph_has_dynamic_batch_and_metadata(exported):
    run, _, _ = exported
    proto = onnx.load(str(run / "model.onnx"))
    onnx.checker.check_model(proto)
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and outp.name == "probs"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [1, SIZE, SIZE]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ptxseg.input_size"] == str(SIZE)
    assert meta["ptxseg.arch"] == "unet" and meta["ptxseg.encoder"] == "efficientnet-b0"
    norm = json.loads(meta["ptxseg.normalization"])
    # literal values (a changed table fails the test), as the model's own buffers say
    np.testing.assert_allclose(norm["mean"], (0.485, 0.456, 0.406), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], (0.229, 0.224, 0.225), rtol=1e-6)
    assert norm["scale"] == pytest.approx(1 / 255)
    assert norm["channels"] == "gray replicated to 3 channels" and norm["inside_graph"] is True
    import hashlib

    digest = hashlib.sha256((run / "best.ckpt").read_bytes()).hexdigest()
    assert meta["ptxseg.checkpoint_sha256"] == digest


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch_on_real_images(exported, images, batch):
    run, model, _ = exported
    x = images[:batch, None].astype(np.float32)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": x})[0]
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert got.shape == (batch, 1, SIZE, SIZE)
    assert np.abs(got - want).max() < 1e-4


def test_onnx_backend_matches_torch_backend(exported, sample_dir, tmp_path):
    """Same pipeline, both backends, batches of 3 (PNG + real DICOMs): the same masks and
    Kaggle rows, probabilities within 1e-4.

    "The same" up to exact ties: fp32 kernels of two runtimes differ by ~1e-6, so a pixel whose
    probability lies that close to the threshold may fall either way. The test allows only
    such pixels (|p - 0.5| < 1e-4 in an independent torch computation), and only a handful."""
    run, model, _ = exported
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((sample_dir / "png_images").glob("*.png"))[5:8]:
        shutil.copy(p, inputs)
    for p in sorted((sample_dir / "dicom").glob("*.dcm"))[:2]:
        shutil.copy(p, inputs)
    outs = {}
    for backend in ("torch", "onnx"):
        outs[backend] = tmp_path / backend
        rc, _, err = run_cli(["predict", str(run), str(inputs), "--out", str(outs[backend]),
                              "--backend", backend, "--batch-size", "3", "--workers", "0",
                              "--no-overlays", "--kaggle-csv", str(outs[backend] / "k.csv")])
        assert rc == 0, err
    rows = {b: list(csv.DictReader(open(outs[b] / "results.csv"))) for b in outs}
    assert [r["id"] for r in rows["torch"]] == [r["id"] for r in rows["onnx"]]
    assert len(rows["torch"]) == 5
    ties = 0
    for rt, ro in zip(rows["torch"], rows["onnx"], strict=True):
        a = cv2.imread(str(outs["torch"] / "masks" / f"{rt['id']}.png"), 0)
        b = cv2.imread(str(outs["onnx"] / "masks" / f"{ro['id']}.png"), 0)
        assert 0 < int(rt["area_px"]) < a.size  # masks with something in them
        differ = a != b
        if differ.any():
            probs = expected_probs(model, read_image(rt["source"]))
            assert (np.abs(probs[differ] - 0.5) < 1e-4).all(), rt["id"]
            ties += int(differ.sum())
        assert float(ro["max_prob"]) == pytest.approx(float(rt["max_prob"]), abs=1e-4)
        assert abs(int(ro["area_px"]) - int(rt["area_px"])) == int(differ.sum())
    assert ties <= 10
    kaggle = {b: list(csv.reader(open(outs[b] / "k.csv"))) for b in outs}
    assert [r[0] for r in kaggle["torch"]] == [r[0] for r in kaggle["onnx"]]
    assert ties or kaggle["torch"] == kaggle["onnx"]
    info = json.loads((outs["onnx"] / "predict.json").read_text())
    assert info["backend"].startswith("onnx ") and info["input_size"] == SIZE
    # probabilities themselves, at model resolution
    entries = [(p.stem, p) for p in sorted(inputs.iterdir())]
    onnx_model = OnnxModel(run / "model.onnx", ["CPUExecutionProvider"])
    p_onnx = np.stack([p for _, p in file_probs(onnx_model, entries, batch_size=3)])
    p_torch = np.stack([p for _, p in file_probs(model, entries, batch_size=3)])
    assert np.abs(p_onnx - p_torch).max() < 1e-4


def test_onnx_backend_reads_nothing_but_the_onnx_file_and_thresholds(exported, sample_dir,
                                                                     tmp_path):
    run, _, _ = exported
    bare = tmp_path / "bare"  # no config.yaml, no checkpoint
    bare.mkdir()
    shutil.copy(run / "thresholds.json", bare)
    model = tmp_path / "elsewhere.onnx"
    shutil.copy(run / "model.onnx", model)
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    rc, _, err = run_cli(["predict", str(bare), str(png), "--out", str(tmp_path / "o"),
                          "--backend", "onnx", "--model", str(model), "--workers", "0"])
    assert rc == 0, err
    assert (tmp_path / "o" / "masks" / f"{png.stem}.png").exists()
    # without --model it looks for RUN/model.onnx, and says so
    rc, _, err = run_cli(["predict", str(bare), str(png), "--out", str(tmp_path / "o2"),
                          "--backend", "onnx"])
    assert rc == 2
    assert f"{bare / 'model.onnx'}: ONNX model not found" in err


def test_onnx_hflip_tta(tmp_path, images):
    """The ONNX backend's TTA: exact for a mirror-symmetric network, an average otherwise."""
    torch.manual_seed(5)
    from ptxseg.model import build_model
    from tests.conftest import tiny_config

    net = build_model(tiny_config().model, pretrained=False).eval()
    x = images[:2, None]
    results = {}
    for name, module in (("sym", MirrorSymmetric(net)), ("plain", net)):
        data, _ = export_model(module, SIZE)
        (tmp_path / f"{name}.onnx").write_bytes(data)
        m = OnnxModel(tmp_path / f"{name}.onnx", ["CPUExecutionProvider"])
        results[name] = m.probs(x, "none"), m.probs(x, "hflip")
    sym_none, sym_tta = results["sym"]
    np.testing.assert_allclose(sym_tta, sym_none, atol=1e-6)
    plain_none, plain_tta = results["plain"]
    m = OnnxModel(tmp_path / "plain.onnx", ["CPUExecutionProvider"])
    mirror = m.probs(np.ascontiguousarray(x[..., ::-1]), "none")[..., ::-1]
    np.testing.assert_allclose(plain_tta, (plain_none + mirror) / 2, atol=1e-6)
    assert np.abs(plain_tta - plain_none).max() > 1e-3


def test_advprop_normalisation_is_inside_the_graph_and_its_metadata(tmp_path, images):
    """A model of advprop weights (mean = std = 0.5, literal): the export's metadata says so,
    and ONNX Runtime, fed raw 0..255 values, gives the torch model's probabilities."""
    from ptxseg.model import build_model
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(**{"model.encoder_weights": "advprop"}).model,
                        pretrained=False).eval()  # fmt: skip
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    data, _ = export_model(model, SIZE)
    proto = onnx.load_model_from_string(data)
    norm = json.loads({p.key: p.value for p in proto.metadata_props}["ptxseg.normalization"])
    assert norm["mean"] == [0.5, 0.5, 0.5] and norm["std"] == [0.5, 0.5, 0.5]
    x = images[:2, None].astype(np.float32)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
        ["probs"], {"image": x}
    )[0]
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_failed_parity_writes_nothing(exported, tmp_path, monkeypatch):
    import ptxseg.export

    run, _, _ = exported
    monkeypatch.setattr(ptxseg.export, "parity", lambda *a, **k: 0.25)
    target = tmp_path / "m.onnx"
    rc, _, err = run_cli(["export", str(run), "--out", str(target)])
    assert rc == 2
    assert "probabilities differ by 0.25 (tolerance 0.0001)" in err
    assert not target.exists() and not list(tmp_path.iterdir())


def test_unusable_onnx_files_are_one_line_errors(exported, tmp_path, sample_dir):
    run, _, _ = exported
    png = sorted((sample_dir / "png_images").glob("*.png"))[0]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx at all")
    # a valid ONNX graph that is not a ptxseg export (no metadata)
    node = onnx.helper.make_node("Identity", ["image"], ["probs"])
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [vi("image", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                                   [vi("probs", onnx.TensorProto.FLOAT, [1, 1, 4, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(foreign))
    for path, expected in ((garbage, "not a readable ONNX model"),
                           (foreign, "not a ptxseg export (no ptxseg.input_size metadata)")):
        rc, _, err = run_cli(["predict", str(run), str(png), "--out", str(tmp_path / "o"),
                              "--backend", "onnx", "--model", str(path)])
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {expected}"), err
