"""Training losses: the paper's BCE + soft Dice (the default) and the options of
segmentation-models-pytorch (``smp.losses``), chosen by ``loss.name``.

:data:`LOSSES` is a plain registry, name -> builder taking the ``loss`` config section;
:func:`build_loss` looks a name up and refuses an unknown one with the list (the config
refuses it first: ``loss.name`` is one of the registry's names). Every option is binary and
takes logits; the terms are computed in float32 whatever the autocast dtype.

- ``dice_bce`` (default): ``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice)``,
  1 and 1 in the recipe (:class:`BceDiceLoss`).
- ``focal``: smp ``FocalLoss(mode="binary", alpha=focal_alpha, gamma=focal_gamma)``, the mean
  over all pixels of the batch.
- ``dice_focal``: ``dice_weight * (1 - soft Dice) + focal_weight * focal``.
- ``lovasz``: smp ``LovaszLoss(mode="binary", per_image=False)``: the Lovasz hinge over the
  whole batch (a surrogate of IoU).
- ``tversky``: smp ``TverskyLoss(mode="binary", alpha=tversky_alpha, beta=tversky_beta,
  gamma=tversky_gamma)``: ``(1 - TP / (TP + alpha FP + beta FN)) ** gamma`` over the batch.

Soft Dice and Tversky follow smp's rule for a batch without any positive pixel: that term
contributes 0 (only the other term of a combination remains).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss, TverskyLoss
from torch import nn

from ptxseg.config import LossConfig
from ptxseg.errors import ConfigError


class WeightedLoss(nn.Module):
    """``sum(weight_i * term_i(logits, target))`` in float32; terms of weight 0 are skipped.

    Shape:
        - logits: ``(B, 1, H, W)`` float
        - target: ``(B, 1, H, W)`` in {0, 1} (any dtype)
        - output: scalar
    """

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList([t for _, t in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(())
        for weight, term in zip(self.weights, self.terms, strict=True):
            if weight:
                loss = loss + weight * term(logits, target)
        return loss


class BceDiceLoss(WeightedLoss):
    """``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice)``, the paper's loss.

    BCE is the mean over all pixels of the batch. Soft Dice is computed over the whole batch
    (sums over every pixel of every image, smp's ``DiceLoss(mode="binary")``): ``1 - 2 sum(p t)
    / (sum(p) + sum(t))`` with ``p = sigmoid(logits)``; a batch without any positive pixel
    contributes no Dice term (smp's rule: Dice is undefined there), only BCE.

    Both terms are computed in float32 whatever the autocast dtype of the logits.

    Shape:
        - logits: ``(B, 1, H, W)`` float
        - target: ``(B, 1, H, W)`` in {0, 1} (any dtype)
        - output: scalar
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__([(bce_weight, nn.BCEWithLogitsLoss()), (dice_weight, _dice())])


def _focal(cfg: LossConfig) -> nn.Module:
    return FocalLoss(mode="binary", alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)


def _dice() -> nn.Module:
    return DiceLoss(mode="binary", from_logits=True)


#: ``loss.name`` -> builder of the loss module from the ``loss`` config section
LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "dice_bce": lambda cfg: BceDiceLoss(cfg.bce_weight, cfg.dice_weight),
    "focal": lambda cfg: WeightedLoss([(1.0, _focal(cfg))]),
    "dice_focal": lambda cfg: WeightedLoss(
        [(cfg.dice_weight, _dice()), (cfg.focal_weight, _focal(cfg))]
    ),
    "lovasz": lambda cfg: WeightedLoss([(1.0, LovaszLoss(mode="binary", per_image=False))]),
    "tversky": lambda cfg: WeightedLoss(
        [
            (
                1.0,
                TverskyLoss(
                    mode="binary",
                    from_logits=True,
                    alpha=cfg.tversky_alpha,
                    beta=cfg.tversky_beta,
                    gamma=cfg.tversky_gamma,
                ),
            )
        ]
    ),
}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module ``loss.name`` names, with its parameters from ``cfg``.

    Raises:
        ConfigError: an unknown name (listing the valid ones).
    """
    builder = LOSSES.get(cfg.name)
    if builder is None:
        raise ConfigError(f"loss.name: unknown '{cfg.name}' (valid: {', '.join(LOSSES)})")
    return builder(cfg)
