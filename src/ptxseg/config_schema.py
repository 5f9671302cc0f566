"""The config's schema: one pydantic model per section, every key typed, bounded and
described (``ptxseg config show`` prints the descriptions). Loading, overrides and the
built-in configs: :mod:`ptxseg.config`.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ptxseg.data.sources import Layout
from ptxseg.hardware import ACCELERATOR_CHOICES
from ptxseg.normalization import WEIGHT_NAMES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    size: int = Field(
        512,
        ge=32,
        le=4096,
        description="square model input size in pixels (a multiple of 32); images and masks "
        "are resized to it for training, and predictions are resized back",
    )
    val_fraction: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="share of the images held out for validation (stratified by label, "
        "grouped by patient where known, seeded by train.seed)",
    )
    workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes that decode and augment images; null = this "
        "process's CPU cores minus one (at most 16), 0 = load in the training process",
    )
    layout: Literal[Layout.values()] = Field(  # type: ignore[valid-type]
        "auto",
        description="dataset layout; auto detects it (png pairs, SIIM DICOM + run-length CSV, "
        "PTX-498 sites, csv manifest)",
    )
    rle: str | None = Field(
        None,
        description="run-length CSV of a siim dataset with several (relative: from the dataset "
        "folder); null = the folder's own",
    )
    positive_fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="share of training draws that show a pneumothorax (sampled with "
        "replacement, an epoch = as many draws as training images); null = the natural rate "
        "(plain shuffle)",
    )

    @field_validator("size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("must be a multiple of 32 (the U-Net downsamples 5 times)")
        return v


class ModelConfig(_Section):
    arch: str = Field(
        "unet",
        description="segmentation architecture: any segmentation-models-pytorch name (unet, "
        "unetplusplus, fpn, deeplabv3plus ...)",
    )
    encoder: str = Field(
        "efficientnet-b4",
        description="encoder (backbone): any segmentation-models-pytorch encoder name, or "
        "tu-NAME for a timm model NAME (e.g. tu-tf_efficientnet_lite0)",
    )
    encoder_weights: str | None = Field(
        "imagenet",
        description="encoder initialisation: 'imagenet' (downloaded on first use), another "
        "weights name of the encoder (e.g. 'advprop'), null (random), or a path to a local "
        "encoder weights file (smp, timm or EfficientNet-PyTorch names, mapped by "
        "ptxseg.weights; its sha256 goes to weights.json); not used (and not downloaded) when "
        "model.init_from is set. The weights choose the input normalisation (mean/std; null: "
        "ImageNet's)",
    )
    encoder_weights_kind: Literal[WEIGHT_NAMES] = Field(  # type: ignore[valid-type]
        "imagenet",
        description="for a local encoder_weights file: the pretrained weights it holds, which "
        "choose the input normalisation (mean/std); ignored otherwise",
    )
    bn_momentum: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="BatchNorm momentum for every layer; null keeps the encoder's own (0.01 "
        "for smp's EfficientNet, tuned for pretrained weights). 0.1 helps short from-scratch runs.",
    )
    init_from: str | None = Field(
        None,
        description="fine-tuning: start from the weights of a run folder (its best "
        "checkpoint) or of a checkpoint file, with a fresh optimizer and LR schedule; arch and "
        "encoder must match it; encoder_weights is then ignored; its path and sha256 are "
        "recorded with the run's dataset",
    )


class LossConfig(_Section):
    name: Literal["dice_bce", "focal", "dice_focal", "lovasz", "tversky"] = Field(
        "dice_bce",
        description="training loss (segmentation-models-pytorch, binary, from logits): "
        "dice_bce = bce_weight x BCE + dice_weight x soft Dice (the paper's); focal; "
        "dice_focal = dice_weight x Dice + focal_weight x focal; lovasz (Lovasz hinge); "
        "tversky",
    )
    bce_weight: float = Field(
        1.0, ge=0.0, description="dice_bce: weight of the binary cross-entropy term"
    )
    dice_weight: float = Field(
        1.0, ge=0.0, description="dice_bce, dice_focal: weight of the soft Dice term"
    )
    focal_weight: float = Field(
        1.0, ge=0.0, description="dice_focal: weight of the focal term"
    )
    focal_gamma: float = Field(
        2.0, ge=0.0, description="focal, dice_focal: focusing exponent gamma"
    )
    focal_alpha: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="focal, dice_focal: weight of the positive class (alpha; negatives get "
        "1 - alpha); null = no class weighting",
    )
    tversky_alpha: float = Field(
        0.5, ge=0.0, description="tversky: weight of false positives (0.5 and 0.5 = Dice)"
    )
    tversky_beta: float = Field(
        0.5, ge=0.0, description="tversky: weight of false negatives (above alpha: recall)"
    )
    tversky_gamma: float = Field(
        1.0, gt=0.0, description="tversky: exponent of the loss (above 1: focal Tversky)"
    )

    @model_validator(mode="after")
    def _not_both_zero(self) -> LossConfig:
        if self.name == "dice_bce" and self.bce_weight == 0 and self.dice_weight == 0:
            raise ValueError(
                "loss.bce_weight and loss.dice_weight are both 0: the loss would be constant "
                "and nothing would be learned (set at least one above 0)"
            )
        if self.name == "dice_focal" and self.focal_weight == 0 and self.dice_weight == 0:
            raise ValueError(
                "loss.focal_weight and loss.dice_weight are both 0: the loss would be "
                "constant and nothing would be learned (set at least one above 0)"
            )
        if self.name == "tversky" and self.tversky_alpha + self.tversky_beta == 0:
            raise ValueError(
                "loss.tversky_alpha and loss.tversky_beta are both 0: the Tversky index would "
                "ignore every error (set at least one above 0)"
            )
        return self


class OptimConfig(_Section):
    lr: float = Field(
        1e-4, gt=0.0, description="Adam learning rate at the start of the cosine schedule"
    )
    lr_min: float = Field(
        1e-6,
        ge=0.0,
        description="learning rate at the last optimizer step of the run (cosine decay from "
        "optim.lr, stepped per batch; an extended run decays again over the added epochs)",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay (L2 penalty)")


class TrainConfig(_Section):
    batch_size: int = Field(
        32, ge=1, description="images per batch and device (effective batch: x devices x nodes)"
    )
    epochs: int = Field(
        300,
        ge=1,
        description="maximum number of epochs (the cosine schedule spans them); raise it with "
        "--resume to extend a run (README: continue or fine-tune)",
    )
    patience: int = Field(
        20,
        ge=1,
        description="early stopping: epochs without a better validation IoU before training "
        "stops (may change on --resume)",
    )
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = Field(
        "auto",
        description="numeric precision: auto = bf16-mixed on GPUs that support it, else "
        "16-mixed on CUDA, 32 on CPU",
    )
    compile: Literal["auto", "regional", "whole", True, False] = Field(
        "auto",
        description="torch.compile for training: regional = the repeated blocks (stem and head "
        "eager; true means regional), whole = the whole network, false = eager; auto = "
        "regional on CUDA when the planned steps repay the compile twice over, else eager "
        "(docs/training-options.md: train.compile)",
    )
    compile_cache: str | None = Field(
        None,
        description="folder of the persistent compile cache (inductor); null = "
        "$XDG_CACHE_HOME/ptxseg/inductor or ~/.cache/ptxseg/inductor; a "
        "TORCHINDUCTOR_CACHE_DIR set in the environment wins",
    )
    devices: int | Literal["auto"] = Field(
        1, description="devices (GPUs) per machine; DDP when more than one; auto = all GPUs"
    )
    accelerator: Literal[ACCELERATOR_CHOICES] = Field(  # type: ignore[valid-type]
        "auto", description="hardware; auto = CUDA when available, else MPS, else CPU"
    )
    seed: int = Field(
        42, description="random seed of the split, the weight initialisation and augmentation"
    )
    channels_last: Literal["auto", True, False] = Field(
        "auto", description="channels_last memory layout; auto = on with CUDA"
    )
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP (torchrun/SLURM)")
    log_every: int = Field(
        20, ge=1, description="steps between progress-bar loss updates (and NaN/inf checks)"
    )
    logger: Literal["csv", "tensorboard", "mlflow"] = Field(
        "csv",
        description="experiment tracking besides the run's own per-epoch metrics file (always "
        "written): "
        "csv = nothing more; tensorboard = RUN/tensorboard/ event files; mlflow = a local "
        "MLflow store RUN/mlflow.db (no server); both need pip install 'ptxseg[tracking]'",
    )
    deterministic: Literal[False, True, "warn"] = Field(
        False,
        description="torch.use_deterministic_algorithms (and no cuDNN autotuning): true fails "
        "on ops without a deterministic CUDA kernel, 'warn' only warns (docs/reliability.md)",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class AugmentConfig(_Section):
    enabled: bool = Field(True, description="augment training images (validation: resize only)")
    hflip_p: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    color_p: float = Field(
        0.3, ge=0.0, le=1.0, description="probability of a brightness/contrast or gamma change"
    )
    distort_p: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="probability of an elastic, grid or optical distortion",
    )
    affine_p: float = Field(
        0.5, ge=0.0, le=1.0, description="probability of an affine translate/scale/rotate"
    )


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and input size")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the network")
    loss: LossConfig = Field(default_factory=LossConfig, description="the training loss")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer, LR schedule")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="training augmentations"
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
