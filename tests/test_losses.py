"""BCE + soft Dice against a hand computation in NumPy; the other loss options (loss.name)
against smp's own functions and NumPy."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from ptxseg.config import LossConfig, load_config
from ptxseg.errors import ConfigError
from ptxseg.losses import LOSSES, BceDiceLoss, build_loss


def _reference(logits: np.ndarray, target: np.ndarray, wb: float, wd: float) -> float:
    x = logits.astype(np.float64)
    t = target.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    bce = np.mean(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    dice = 0.0 if t.sum() == 0 else 1.0 - 2 * (p * t).sum() / (p.sum() + t.sum())
    return wb * bce + wd * dice


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 1, 16, 16)).astype(np.float32)
    target = (rng.random((3, 1, 16, 16)) < 0.3).astype(np.uint8)
    for wb, wd in ((1.0, 1.0), (0.25, 2.0), (0.0, 1.0), (1.0, 0.0)):
        got = BceDiceLoss(wb, wd)(torch.from_numpy(logits), torch.from_numpy(target))
        assert got.dtype == torch.float32 and got.ndim == 0
        np.testing.assert_allclose(got.item(), _reference(logits, target, wb, wd), rtol=1e-5)


def test_batch_without_positive_pixel_is_bce_only():
    logits = torch.full((2, 1, 8, 8), -1.0)
    target = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    got = build_loss(LossConfig())(logits, target).item()
    np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-6)


def test_half_precision_logits_give_float32_loss_and_gradients():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(0, 2, (2, 1, 8, 8)), dtype=torch.bfloat16, requires_grad=True)
    target = torch.from_numpy((rng.random((2, 1, 8, 8)) < 0.5).astype(np.uint8))
    loss = BceDiceLoss()(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()
    ref = _reference(logits.detach().float().numpy(), target.numpy(), 1.0, 1.0)
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# loss options (loss.name): each equal to smp's own function, built here independently

def _fixed(seed=3, shape=(3, 1, 12, 12), p=0.25):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 2.5, shape).astype(np.float32))
    target = torch.from_numpy((rng.random(shape) < p).astype(np.uint8))
    return logits, target


def _smp(name, cfg):
    L = smp.losses
    if name == "focal":
        return L.FocalLoss("binary", alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
    if name == "lovasz":
        return L.LovaszLoss("binary", per_image=False, from_logits=True)
    if name == "tversky":
        return L.TverskyLoss("binary", from_logits=True, alpha=cfg.tversky_alpha,
                             beta=cfg.tversky_beta, gamma=cfg.tversky_gamma)
    if name == "dice":
        return L.DiceLoss("binary", from_logits=True)
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("focal", []),
        ("focal", ["loss.focal_gamma=3.0", "loss.focal_alpha=0.25"]),
        ("lovasz", []),
        ("tversky", []),
        ("tversky", ["loss.tversky_alpha=0.3", "loss.tversky_beta=0.7",
                     "loss.tversky_gamma=1.5"]),
    ],
)
def test_each_option_equals_smps_function(name, sets):
    cfg = load_config("paper", [f"loss.name={name}", *sets]).loss
    logits, target = _fixed()
    got = build_loss(cfg)(logits, target)
    want = _smp(name, cfg)(logits, target.float())
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dice_bce", "focal", "dice_focal", "lovasz", "tversky"])
def test_the_training_module_uses_the_configured_loss(name):
    """SegModule's loss (what training_step and validation_step call) is loss.name's, with
    its parameters: equal to smp's function (or the NumPy reference of the default)."""
    from ptxseg.lightning_module import SegModule
    from tests.conftest import tiny_config

    sets = {"loss.name": name, "loss.focal_gamma": 1.5, "loss.tversky_alpha": 0.7,
            "loss.tversky_beta": 0.3, "loss.dice_weight": 0.5}
    cfg = tiny_config(**sets)
    module = SegModule(cfg, pretrained=False)
    logits, target = _fixed(9)
    got = module.loss_fn(logits, target)
    if name == "dice_bce":
        want = _reference(logits.numpy(), target.numpy(), 1.0, 0.5)
        np.testing.assert_allclose(got.item(), want, rtol=1e-5)
        return
    if name == "dice_focal":
        want = 0.5 * _smp("dice", cfg.loss)(logits, target.float()) + _smp(
            "focal", cfg.loss)(logits, target.float())
    else:
        want = _smp(name, cfg.loss)(logits, target.float())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_dice_focal_is_the_weighted_sum_of_smps_terms():
    cfg = load_config("paper", ["loss.name=dice_focal", "loss.dice_weight=0.5",
                                "loss.focal_weight=2.0", "loss.focal_gamma=1.0"]).loss
    logits, target = _fixed(4)
    dice = smp.losses.DiceLoss("binary", from_logits=True)(logits, target.float())
    focal = smp.losses.FocalLoss("binary", gamma=1.0)(logits, target.float())
    torch.testing.assert_close(build_loss(cfg)(logits, target), 0.5 * dice + 2.0 * focal)


def test_focal_and_tversky_against_numpy():
    """The formulas, not only smp: focal = mean(-a_t (1 - p_t)^g log p_t); Tversky =
    (1 - TP / (TP + a FP + b FN))^g over the batch."""
    logits, target = _fixed(5)
    x = logits.numpy().astype(np.float64)
    t = target.numpy().astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, 0.25, 0.75)
    focal = np.mean(-at * (1 - pt) ** 2.0 * np.log(pt))
    cfg = load_config("paper", ["loss.name=focal", "loss.focal_alpha=0.25"]).loss
    np.testing.assert_allclose(build_loss(cfg)(logits, target).item(), focal, rtol=1e-5)
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    tversky = (1 - tp / (tp + 0.3 * fp + 0.7 * fn)) ** 1.5
    cfg = load_config("paper", ["loss.name=tversky", "loss.tversky_alpha=0.3",
                                "loss.tversky_beta=0.7", "loss.tversky_gamma=1.5"]).loss
    np.testing.assert_allclose(build_loss(cfg)(logits, target).item(), tversky, rtol=1e-5)


def test_lovasz_hinge_against_numpy():
    logits, target = _fixed(6, shape=(2, 1, 6, 6))
    x = logits.numpy().astype(np.float64).ravel()
    t = target.numpy().astype(np.float64).ravel()
    errors = 1 - x * (2 * t - 1)
    order = np.argsort(-errors, kind="stable")
    e, g = errors[order], t[order]
    inter = g.sum() - np.cumsum(g)
    union = g.sum() + np.cumsum(1 - g)
    jac = 1 - inter / union
    jac[1:] = jac[1:] - jac[:-1]
    want = float(np.dot(np.maximum(e, 0), jac))
    cfg = load_config("paper", ["loss.name=lovasz"]).loss
    np.testing.assert_allclose(build_loss(cfg)(logits, target).item(), want, rtol=1e-5)


def test_default_is_unchanged_bce_plus_dice():
    cfg = load_config("paper").loss
    assert cfg.name == "dice_bce" and (cfg.bce_weight, cfg.dice_weight) == (1.0, 1.0)
    loss = build_loss(cfg)
    assert isinstance(loss, BceDiceLoss)
    logits, target = _fixed(7)
    ref = _reference(logits.numpy(), target.numpy(), 1.0, 1.0)
    np.testing.assert_allclose(loss(logits, target).item(), ref, rtol=1e-5)
    cfg2 = load_config("paper", ["loss.bce_weight=0.25", "loss.dice_weight=2"]).loss
    np.testing.assert_allclose(build_loss(cfg2)(logits, target).item(),
                               _reference(logits.numpy(), target.numpy(), 0.25, 2.0), rtol=1e-5)


@pytest.mark.parametrize("name", ["focal", "dice_focal", "lovasz", "tversky"])
def test_every_option_gives_float32_and_gradients_from_bf16(name):
    logits, target = _fixed(8)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    loss = build_loss(load_config("paper", [f"loss.name={name}"]).loss)(x, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


def test_registry_matches_the_config_and_unknown_names_are_refused():
    annotation = LossConfig.model_fields["name"].annotation
    assert tuple(LOSSES) == typing.get_args(annotation)
    with pytest.raises(ConfigError) as exc:
        load_config("paper", ["loss.name=dice_lovasz"])
    msg = str(exc.value)
    assert "'loss.name'" in msg
    assert "'dice_bce', 'focal', 'dice_focal', 'lovasz' or 'tversky'" in msg
    bogus = LossConfig.model_construct(name="nope")
    with pytest.raises(ConfigError, match="loss.name: unknown 'nope' \\(valid: dice_bce, focal, "
                       "dice_focal, lovasz, tversky\\)"):
        build_loss(bogus)
    with pytest.raises(ConfigError, match="loss.focal_weight and loss.dice_weight are both 0"):
        load_config("paper", ["loss.name=dice_focal", "loss.dice_weight=0",
                              "loss.focal_weight=0"])
    # dice_bce's weights may both be 0 when another loss is chosen (they are not used)
    load_config("paper", ["loss.name=focal", "loss.dice_weight=0", "loss.bce_weight=0"])
