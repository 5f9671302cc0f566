"""The paper's training recipe as a LightningModule: the configured loss (``loss.name``,
:func:`ptxseg.losses.build_loss`; BCE + Dice by default), Adam, a cosine LR schedule stepped per
batch, validation IoU/Dice from pixel counts pooled over the whole
validation set at probability 0.5 (``logit > 0``).

Speed on a GPU: no host-device sync in the training step except every ``train.log_every``
steps (progress bar, NaN check); the validation counts stay on the device until the epoch
ends. Parameters the network never uses (smp's EfficientNet ``_conv_head``) are frozen for DDP
(:func:`freeze_unused_parameters`).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import torch

from ptxseg import compilation, hardware
from ptxseg.checkpoint import checkpoint_info
from ptxseg.config import Config
from ptxseg.errors import PtxsegError
from ptxseg.losses import build_loss
from ptxseg.metrics import dice_scores, iou_scores
from ptxseg.model import build_model
from ptxseg.normalization import Normalization
from ptxseg.run import BEST, LAST


class TrainingError(PtxsegError):
    """Training cannot go on (the loss turned NaN/inf)."""


class CosineToMin:
    """LR factor: cosine from 1 at step ``start`` to ``min_ratio`` at step ``start +
    total_steps - 1`` (the last optimizer step of the run, or of an extension), then flat. A
    plain object so that ``LambdaLR`` saves its fields in the checkpoint: a resumed run keeps
    the exact schedule."""

    def __init__(self, total_steps: int, min_ratio: float, start: int = 0):
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)
        self.start = int(start)

    def __call__(self, step: int) -> float:
        if self.total_steps <= 1:
            return 1.0
        t = min(max(step - self.start, 0), self.total_steps - 1) / (self.total_steps - 1)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class SegModule(L.LightningModule):
    """The paper's training step around :class:`~ptxseg.model.SegModel` (``self.model``, so
    checkpoints hold ``model.*`` weights that :func:`ptxseg.checkpoint.load_checkpoint` reads).

    Shape:
        - batch: ``(image, mask)``, ``(B, 1, S, S)`` uint8 each, mask in {0, 1}
    """

    def __init__(
        self,
        cfg: Config,
        *,
        pretrained: bool = True,
        channels_last: bool = False,
        normalization: Normalization | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, pretrained=pretrained, normalization=normalization)
        self.loss_fn = build_loss(cfg.loss)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.shown: dict[str, float] = {}  # what the progress bar displays (python floats)
        self.last_row: dict[str, float] | None = None
        self.warn_no_positive = True
        self.restart_schedule = False  # an extended run: a new cosine segment (fit)
        self._last_lr = cfg.optim.lr
        self._epoch_t0 = time.perf_counter()

    # -- forward / steps ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _zeros(self, n: int, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(n, device=self.device, dtype=dtype)

    def on_train_start(self) -> None:
        if self.restart_schedule:
            self._restart_schedule()

    def _restart_schedule(self) -> None:
        """Extending a run (SGDR-style warm restart): from the restored step on, the LR
        follows a new cosine from ``optim.lr`` down to ``optim.lr_min`` over the added steps;
        the first added step runs at ``optim.lr``."""
        sched = self.lr_schedulers()
        opt = self.trainer.optimizers[0]
        start = int(sched.last_epoch)  # optimizer steps done (= global_step)
        added = max(1, int(self.trainer.estimated_stepping_batches) - start)
        factor = CosineToMin(added, self.cfg.optim.lr_min / self.cfg.optim.lr, start=start)
        sched.lr_lambdas = [factor for _ in opt.param_groups]
        sched.base_lrs = [self.cfg.optim.lr for _ in opt.param_groups]
        for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
            group["lr"] = base * factor(start)
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the model's own description (a checkpoint alone predicts), and the epochs the LR
        # schedule was built for: a resume with another train.epochs is an extension (a new
        # cosine segment), with the same one an exact continuation
        checkpoint["ptxseg"] = {
            **checkpoint_info(self.cfg, self.model),
            "epochs": self.cfg.train.epochs,
        }

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()
        self._train_acc = self._zeros(2)  # loss sum, steps
        self._nonfinite = self._zeros(1, torch.bool)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        d = loss.detach()
        self._train_acc += torch.stack([d, torch.ones_like(d)])
        self._nonfinite |= ~torch.isfinite(d)
        self._last_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        if (batch_idx + 1) % self.cfg.train.log_every == 0:
            self._check_finite(batch_idx)
            self.shown["loss"] = float(d)
        return loss

    def _check_finite(self, batch_idx: int | None = None) -> None:
        bad = bool(self._nonfinite.item())
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            where = f"epoch {self.current_epoch + 1}"
            if batch_idx is not None:
                where += f", batch {batch_idx + 1}"
            raise TrainingError(
                f"the training loss became NaN/inf ({where}); training stopped. {LAST} and "
                f"{BEST}, where an epoch finished before, hold the last good epoch (try a "
                "lower optim.lr or train.precision=32)"
            )

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking and hasattr(self, "_nonfinite"):
            self._check_finite()  # never let a NaN model reach a checkpoint
        self._val_counts = self._zeros(3, torch.int64)  # tp, fp, fn
        self._val_acc = self._zeros(2)  # loss * images, images

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        pred = logits > 0  # probability > 0.5
        truth = y.bool()
        tp = (pred & truth).sum()
        self._val_counts += torch.stack([tp, pred.sum() - tp, truth.sum() - tp])
        self._val_acc += torch.stack([loss.detach() * x.shape[0], loss.new_tensor(x.shape[0])])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        reduce = self.trainer.strategy.reduce
        tp, fp, fn = (int(v) for v in reduce(self._val_counts, reduce_op="sum").tolist())
        val_loss_sum, n_val = reduce(self._val_acc, reduce_op="sum").tolist()
        train = getattr(self, "_train_acc", None)
        train_sum, n_train = (0.0, 0) if train is None else reduce(train, reduce_op="sum").tolist()
        iou = float(iou_scores(tp, fp, fn))
        dice = float(dice_scores(tp, fp, fn))
        if tp + fn == 0 and self.warn_no_positive:
            self.warn_no_positive = False
            warnings.warn(
                "the validation set has no positive pixel: val IoU/Dice only measure false "
                f"positives (1.0 when nothing is predicted), so {BEST} is not meaningful",
                UserWarning,
                stacklevel=1,
            )
        row = {
            "epoch": self.current_epoch + 1,
            "train_loss": train_sum / n_train if n_train else math.nan,
            "val_loss": val_loss_sum / max(n_val, 1),
            "val_iou": iou,
            "val_dice": dice,
            "lr": self._last_lr,
            "time_s": time.perf_counter() - self._epoch_t0,
        }
        self.last_row = row
        self.shown.update(loss=row["train_loss"], val_iou=iou, val_dice=dice)
        for key in ("val_iou", "val_dice", "val_loss", "train_loss"):
            self.log(key, float(row[key]), on_epoch=True, sync_dist=False)

    # -- optimizer --------------------------------------------------------------------------

    def configure_optimizers(self):
        optim = self.cfg.optim
        opt = torch.optim.Adam(
            self.model.parameters(),
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            fused=self.device.type == "cuda",
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineToMin(total, optim.lr_min / optim.lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def freeze_unused_parameters(model: torch.nn.Module, size: int = 64) -> list[str]:
    """Set ``requires_grad=False`` on the parameters the forward pass never uses (smp's
    EfficientNet encoders keep ``_conv_head``/``_bn1``), found with one small backward pass in
    eval mode (running statistics untouched). DDP refuses parameters without gradient unless
    it searches for them at every step; frozen, they are simply not synchronised. Weights and
    checkpoint keys do not change. Returns the names frozen."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8)
        model(x).float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        for name, p in model.named_parameters():
            p.grad = None
            if name in unused:
                p.requires_grad_(False)
    finally:
        model.train(was_training)
    return unused


def build_module(
    cfg: Config,
    *,
    pretrained: bool = True,
    init_state: dict[str, torch.Tensor] | None = None,
    normalization: Normalization | None = None,
    compile_plan: compilation.Plan | None = None,
) -> SegModule:
    """The module with the config's channels_last/compile settings applied; ``init_state``:
    weights to start from (``model.init_from``), loaded before compiling, with the
    ``normalization`` they were trained with. ``compile_plan``: what to compile
    (:func:`ptxseg.compilation.plan`; default: from the config, the planned steps unknown);
    a compiled module keeps it in ``compile_plan`` and what it compiled in ``compiled``."""
    device = hardware.resolve_device(cfg.train.accelerator, "train.accelerator")
    module = SegModule(
        cfg,
        pretrained=pretrained and init_state is None,
        channels_last=hardware.resolve_switch(cfg.train.channels_last, device),
        normalization=normalization,
    )
    if init_state is not None:
        module.model.load_state_dict(init_state, strict=True)
    if hardware.device_count(cfg.train.devices, device) * cfg.train.num_nodes > 1:
        freeze_unused_parameters(module.model)
    plan = compile_plan if compile_plan is not None else compilation.plan(cfg, device)
    module.compile_plan = plan
    module.compiled = None
    if plan.decision.on:
        compilation.use_cache(plan.location)
        # in place: state_dict keys stay model.*
        module.compiled = compilation.compile_model(module.model, plan.decision.mode)
    return module
