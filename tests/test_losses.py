"""BCE + soft Dice against a hand computation in NumPy."""

from __future__ import annotations

import numpy as np
import torch

from ptxseg.config import LossConfig
from ptxseg.losses import BceDiceLoss


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
    got = BceDiceLoss.from_config(LossConfig())(logits, target).item()
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
