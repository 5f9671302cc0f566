"""Model building, the normalisation bound to the encoder weights, and safe, self-describing
checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ptxseg.checkpoint import load_checkpoint, save_model_checkpoint
from ptxseg.config import load_config
from ptxseg.errors import CheckpointError, ConfigError
from ptxseg.model import build_model
from tests.conftest import tiny_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # written out, not
HALF = (0.5, 0.5, 0.5)  # imported: a changed table must fail these tests


def load_model(cfg, path):
    """A checkpoint's model, its run's config given (the loader of every stage)."""
    return load_checkpoint(path, cfg)[0]


def test_paper_model_builds_offline_and_runs_at_64():
    cfg = load_config("paper", ["model.encoder_weights=null"])
    model = build_model(cfg.model).eval()
    assert type(model.net).__name__ == "Unet"
    assert type(model.net.encoder).__name__ == "EfficientNetEncoder"
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 64, 64) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("sets", "mean", "std"),
    [
        ({"model.encoder_weights": None}, IMAGENET_MEAN, IMAGENET_STD),  # random init
        ({"model.encoder_weights": "imagenet"}, IMAGENET_MEAN, IMAGENET_STD),
        ({"model.encoder_weights": "advprop"}, HALF, HALF),
        ({"model.encoder_weights": "weights.pth", "model.encoder_weights_kind": "advprop"},
         HALF, HALF),  # a local file of advprop weights
        ({"model.encoder": "timm-tf_efficientnet_lite0", "model.encoder_weights": "imagenet"},
         HALF, HALF),
    ],
)  # fmt: skip
def test_normalisation_follows_the_encoder_weights(sets, mean, std):
    """The mean/std in the model's buffers, and what reaches the network from a gray uint8
    image (replicated to 3 channels, / 255, then per channel), are the literal values the
    weights were trained with (pretrained=False: nothing is downloaded)."""
    model = build_model(tiny_config(**sets).model, pretrained=False).eval()
    assert model.mean.flatten().tolist() == pytest.approx(mean, abs=1e-7)
    assert model.std.flatten().tolist() == pytest.approx(std, abs=1e-7)
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
    g = x.double() / 255.0
    for c in range(3):
        expected = (g[0, 0] - mean[c]) / std[c]
        assert np.allclose(seen["x"][0, c].double().numpy(), expected.numpy(), atol=1e-5)


def test_every_pretrained_pair_smp_offers_has_a_normalisation():
    """The table covers smp's whole registry (read without the network): no valid choice of
    encoder weights is refused, and each pair gets one of the three known normalisations."""
    from segmentation_models_pytorch.encoders import encoders

    from ptxseg.normalization import lookup

    pairs = [(name, w) for name, e in encoders.items() for w in e["pretrained_settings"]]
    assert len(pairs) > 90
    found = {lookup(name, w).mean for name, w in pairs}
    assert found == {IMAGENET_MEAN, HALF, (124 / 255, 117 / 255, 104 / 255)}
    assert lookup("xception", "imagenet").mean == HALF  # Inception-style weights
    assert lookup("dpn68", "imagenet").std == pytest.approx((0.23482446870963955,) * 3)


def test_an_unknown_encoder_weights_pair_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        build_model(tiny_config(**{"model.encoder_weights": "ssl"}).model, pretrained=False)
    assert str(exc.value) == (
        "model.encoder_weights: no normalisation known for efficientnet-b0 with 'ssl' weights "
        "(known for efficientnet-b0: imagenet, advprop)"
    )


def test_a_checkpoint_alone_rebuilds_its_model_with_its_normalisation(tmp_path):
    """Self-describing: model settings, size and mean/std travel inside the file (plain
    types, weights_only=True), so no config is needed to load it."""
    cfg = tiny_config(**{"model.encoder_weights": "advprop", "data.size": 96})
    model = build_model(cfg.model, pretrained=False).eval()
    save_model_checkpoint(model, tmp_path / "alone.ckpt", cfg)
    obj = torch.load(tmp_path / "alone.ckpt", map_location="cpu", weights_only=True)
    assert obj["ptxseg"]["mean"] == [0.5, 0.5, 0.5] and obj["ptxseg"]["size"] == 96
    again, info = load_checkpoint(tmp_path / "alone.ckpt")  # no config given
    assert info.embedded and info.size == 96 and info.model == cfg.model
    assert again.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # a checkpoint of an older ptxseg (weights only) needs its run's config, and gets the
    # ImageNet normalisation every model of that time used
    save_model_checkpoint(model, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="does not describe its model"):
        load_checkpoint(tmp_path / "old.ckpt")
    _, old_info = load_checkpoint(tmp_path / "old.ckpt", cfg)
    assert not old_info.embedded and old_info.normalization.mean == IMAGENET_MEAN


def test_unknown_names_list_the_valid_ones():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match=r"unknown architecture 'unet3' \(valid: .*unetplusplus"):
        build_model(cfg.model.model_copy(update={"arch": "unet3"}))
    with pytest.raises(ConfigError, match=r"unknown encoder 'effnet-b4' \(valid: .*efficientnet-b"):
        build_model(cfg.model.model_copy(update={"encoder": "effnet-b4"}))


def test_local_encoder_weights_file(tmp_path):
    cfg = tiny_config()
    src = build_model(cfg.model)
    path = tmp_path / "enc.pth"
    torch.save(src.net.encoder.state_dict(), path)
    dst = build_model(cfg.model.model_copy(update={"encoder_weights": str(path)}))
    for (k, a), (_, b) in zip(
        src.net.encoder.state_dict().items(), dst.net.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="file not found"):
        build_model(cfg.model.model_copy(update={"encoder_weights": str(tmp_path / "x.pth")}))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    ckpt = tmp_path / "best.ckpt"
    save_model_checkpoint(model, ckpt)
    again = load_model(cfg, ckpt)
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))

    # a checkpoint of another architecture
    other = tiny_config(**{"model.encoder": "resnet18"})
    with pytest.raises(CheckpointError, match="does not match the config"):
        load_model(other, ckpt)

    # truncated file
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_model(cfg, trunc)

    # a pickled object that is not plain weights is refused, never executed
    evil = tmp_path / "evil.ckpt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": Boom()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(cfg, evil)

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(cfg, tmp_path / "none.ckpt")


def test_bn_momentum_override():
    base = build_model(tiny_config().model)
    enc = [m for m in base.net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert enc and all(m.momentum == pytest.approx(0.01) for m in enc)  # smp EfficientNet's
    tuned = build_model(tiny_config(**{"model.bn_momentum": 0.1}).model)
    assert {m.momentum for m in tuned.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value):
    """A checkpoint holding NaN/inf weights is refused at load time, naming the file and the
    first bad tensor, so no stage ever computes from it."""
    cfg = tiny_config()
    model = build_model(cfg.model, pretrained=False).eval()
    bad = "net.segmentation_head.0.bias"
    with torch.no_grad():
        dict(model.named_parameters())[bad].fill_(value)
    ckpt = tmp_path / "nan.ckpt"
    save_model_checkpoint(model, ckpt)
    with pytest.raises(CheckpointError) as exc:
        load_model(cfg, ckpt)
    message = str(exc.value)
    assert message.startswith(f"{ckpt}: refusing to load: weight '{bad}' holds 1 non-finite value")
    assert "\n" not in message


def test_cli_refuses_a_nan_checkpoint_in_every_stage(tmp_path, capsys):
    from ptxseg.cli import main
    from ptxseg.data.sources import load_records
    from ptxseg.data.split import write_split
    from ptxseg.data.synthetic import generate
    from tests.conftest import make_run

    run = tmp_path / "run"
    model = make_run(run)
    with torch.no_grad():
        model.net.decoder.blocks[0].conv1[0].weight[0, 0, 0, 0] = float("nan")
    save_model_checkpoint(model, run / "best.ckpt")
    data = tmp_path / "data"
    generate(data, n=4, size=64, seed=0)
    records, _ = load_records(data)
    write_split(run / "split.csv", records, {r.id: "val" for r in records})
    image = sorted((data / "png_images").glob("*.png"))[0]
    for argv in (
        ["tune", str(run), "--data", str(data)],
        ["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "e")],
        ["predict", str(run), str(image), "--out", str(tmp_path / "p")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run / 'best.ckpt'}: refusing to load: weight ") and (
            "non-finite" in err and "\n" not in err
        ), err
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()
    assert not (run / "thresholds.json").exists()


def _tiny_onnx(path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))


@pytest.mark.parametrize("name", ["model.onnx", "renamed.ckpt"])
def test_an_onnx_file_is_named_as_such(tmp_path, name):
    path = tmp_path / name
    _tiny_onnx(path)
    with pytest.raises(CheckpointError) as exc:
        load_model(tiny_config(), path)
    assert str(exc.value) == f"{path}: is an ONNX model, not a checkpoint (use --backend onnx)"


def test_other_files_are_not_checkpoints(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tiny_config(), path)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_model(tiny_config(), empty)


def test_evaluate_refuses_non_finite_probabilities(tmp_path):
    """Even a model that loads (finite weights) but outputs NaN never reaches a result."""
    from ptxseg.data.sources import load_records
    from ptxseg.data.synthetic import generate
    from ptxseg.errors import PtxsegError
    from ptxseg.evaluate import iter_predictions
    from ptxseg.predictor import Member, Predictor, TorchModel

    class NanNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.full_like(x, float("nan"), dtype=torch.float32) + self.w

    generate(tmp_path / "d", n=2, size=64, seed=0)
    records, _ = load_records(tmp_path / "d")
    with pytest.raises(PtxsegError, match="probabilities are not finite"):
        list(iter_predictions(Predictor([Member(TorchModel(NanNet()), 64)], workers=0), records))
