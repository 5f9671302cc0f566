"""The paper's loss: BCE-with-logits + soft Dice (binary), weighted by ``loss.bce_weight`` and
``loss.dice_weight`` (1 and 1 in the recipe)."""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from ptxseg.config import LossConfig


class BceDiceLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice)``.

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
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(mode="binary", from_logits=True)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> BceDiceLoss:
        return cls(cfg.bce_weight, cfg.dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            loss = loss + self.bce_weight * self.bce(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
