"""The one predictor: in-memory batches and images give what files give, an ensemble averages
its members, the hardware rules resolve in one place, and tune/evaluate run on either
backend."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ptxseg.errors import ConfigError, PtxsegError
from ptxseg.hardware import inference_batch_size, lightning_precision, resolve_device
from ptxseg.model import build_model
from ptxseg.predictor import Member, Predictor, TorchModel
from tests.conftest import tiny_config
from tests.test_predict import SIZE, expected_probs


@pytest.fixture(scope="module")
def nets():
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(build_model(tiny_config().model, pretrained=False).eval())
    return out


@pytest.fixture(scope="module")
def grays(sample_dir):
    """Real radiographs at three sizes (none of them the model's)."""
    pngs = sorted((sample_dir / "png_images").glob("*.png"))[:3]
    return [cv2.resize(cv2.imread(str(p), 0), dsize) for p, dsize in
            zip(pngs, ((200, 160), (96, 128), (300, 300)), strict=True)]  # fmt: skip


def test_in_memory_images_give_what_files_give(nets, grays, tmp_path):
    """image_probs (an HTTP service's way in) equals file_probs on the same images written
    to disk, and an independent computation (resize, network, sigmoid, resize back)."""
    predictor = Predictor([Member(TorchModel(nets[0]), SIZE)], batch_size=2, workers=0)
    in_memory = predictor.image_probs(grays)
    entries = []
    for i, gray in enumerate(grays):
        cv2.imwrite(str(tmp_path / f"{i}.png"), gray)
        entries.append((str(i), tmp_path / f"{i}.png"))
    from ptxseg.data.resize import probs_to_native

    for (_item, probs), gray, got in zip(predictor.file_probs(entries), grays, in_memory,
                                        strict=True):  # fmt: skip
        assert got.shape == gray.shape
        np.testing.assert_array_equal(got, probs_to_native(probs, *gray.shape))
        np.testing.assert_allclose(got, expected_probs(nets[0], gray), atol=1e-5)


def test_an_ensemble_averages_its_members_probabilities(nets, grays):
    from ptxseg.data.resize import resize_to

    x = np.stack([resize_to(g, SIZE) for g in grays])[:, None]
    members = [Member(TorchModel(net), SIZE) for net in nets]
    each = [Predictor([m]).batch_probs(x) for m in members]
    both = Predictor(members).batch_probs(x)
    assert np.abs(each[0] - each[1]).max() > 1e-3  # two different models
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="different input sizes"):
        Predictor([members[0], Member(TorchModel(nets[1]), SIZE * 2)])


def test_hardware_rules(monkeypatch):
    """One place for the device, the batch size and the precision of every stage."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(PtxsegError, match=r"^--device: 'cuda' requested but CUDA is not"):
        resolve_device("cuda")
    with pytest.raises(PtxsegError, match=r"^train.accelerator: 'gpu' requested but CUDA"):
        resolve_device("gpu", "train.accelerator")
    assert (inference_batch_size(None, "cuda"), inference_batch_size(None, "cpu")) == (32, 4)
    assert inference_batch_size(7, "cpu") == 7
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lightning_precision("auto", "cuda") == "bf16-mixed"
    assert lightning_precision("auto", "mps") == "32-true"


def test_tune_and_evaluate_run_on_the_onnx_backend(tiny_run, synth_data, tmp_path):
    """`--backend onnx` on tune and evaluate: the same thresholds and pixel counts as torch (up
    to the rare pixel whose probability ties with a threshold to ~1e-6)."""
    import json
    import shutil

    from tests.test_predict import run_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert run_cli(["export", str(run)])[0] == 0
    found = {}
    for backend in ("torch", "onnx"):
        rc, _, err = run_cli(["tune", str(run), "--backend", backend, "--device", "cpu"])
        assert rc == 0, err
        tuned = json.loads((run / "thresholds.json").read_text())
        out = tmp_path / f"eval-{backend}"
        rc, _, err = run_cli(["evaluate", str(run), "--data", str(synth_data), "--out", str(out),
                              "--backend", backend, "--split", "val"])  # fmt: skip
        assert rc == 0, err
        found[backend] = (tuned, json.loads((out / "metrics.json").read_text()))
    (t_torch, m_torch), (t_onnx, m_onnx) = found["torch"], found["onnx"]
    assert (t_onnx["binary_threshold"], t_onnx["removal_area"]) == (
        t_torch["binary_threshold"], t_torch["removal_area"]
    )
    assert m_onnx["checkpoint"] == "model.onnx" and m_torch["checkpoint"] == "best.ckpt"
    for key in ("tp", "fp", "fn"):
        assert abs(m_onnx["pooled"][key] - m_torch["pooled"][key]) <= 3, key
