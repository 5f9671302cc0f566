"""Typed configuration: YAML sets defaults, ``--set key=value`` overrides them, and the
resolved config is written into the run folder so every run can be repeated from it.

Unknown keys and wrong types are refused with a :class:`~ptxseg.errors.ConfigError` that
names the dotted key.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ptxseg.errors import ConfigError

BUILTIN_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    size: int = Field(512, ge=32, le=4096, description="square model input size (pixels)")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    workers: int | None = Field(None, ge=0, description="DataLoader workers; null = auto")
    layout: Literal["auto", "png", "siim", "ptx498", "csv"] = "auto"
    rle: str | None = Field(
        None,
        description="run-length CSV of a siim dataset with several (relative: from the dataset "
        "folder); null = the folder's own",
    )

    @field_validator("size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("must be a multiple of 32 (the U-Net downsamples 5 times)")
        return v


class ModelConfig(_Section):
    arch: str = "unet"
    encoder: str = "efficientnet-b4"
    encoder_weights: str | None = Field(
        "imagenet", description="'imagenet', null, or a path to a local encoder weights file"
    )
    bn_momentum: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="BatchNorm momentum for every layer; null keeps the encoder's own (0.01 "
        "for smp's EfficientNet, tuned for pretrained weights). 0.1 helps short from-scratch runs.",
    )


class LossConfig(_Section):
    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0.0)
    lr_min: float = Field(1e-6, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(300, ge=1)
    patience: int = Field(20, ge=1)
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = "auto"
    compile: Literal["auto", True, False] = "auto"
    devices: int | Literal["auto"] = 1
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    seed: int = 42
    channels_last: Literal["auto", True, False] = "auto"
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP (torchrun/SLURM)")
    log_every: int = Field(20, ge=1, description="steps between progress-bar loss updates")
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
    enabled: bool = True
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    color_p: float = Field(0.3, ge=0.0, le=1.0)
    distort_p: float = Field(0.3, ge=0.0, le=1.0)
    affine_p: float = Field(0.5, ge=0.0, le=1.0)


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def builtin_configs() -> list[str]:
    """Names of the configs shipped with the package (``paper``, ``demo``...)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'"
    else:
        msg = f"'{key}': {first['msg']} (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {msg}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a built-in config (``paper``, ``demo``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    raise ConfigError(
        f"{name_or_path}: no such config file or built-in config "
        f"(built-in: {', '.join(builtin_configs())})"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        data = _read_yaml(p)
        source = str(p)
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    return validate(data, source if not overrides else f"{source} (with --set)")


def save_config(cfg: Config, path: str | Path) -> None:
    from ptxseg.fileio import write_text

    write_text(path, cfg.to_yaml())


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{path}: missing (is {run_dir} a ptxseg run folder?)")
    return validate(_read_yaml(path), str(path))
