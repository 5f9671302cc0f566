"""Model building and safe checkpoint loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ptxseg.config import load_config
from ptxseg.errors import CheckpointError, ConfigError
from ptxseg.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    load_model,
    save_model_checkpoint,
)
from tests.conftest import tiny_config


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


def test_normalisation_matches_imagenet_on_replicated_gray():
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        model(x)
    g = x.double() / 255.0
    for c in range(3):
        expected = (g[0, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert np.allclose(seen["x"][0, c].double().numpy(), expected.numpy(), atol=1e-5)


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
