"""Build the network from the config; load run checkpoints safely.

The network is wrapped in :class:`SegModel`, which takes raw gray radiographs (values in
[0, 255], one channel) and does the normalisation itself: ImageNet mean/std after repeating
the gray channel three times. The data pipeline therefore ships uint8 to the device (4x less
transfer than float32), and an exported ONNX graph needs no preprocessing beyond a resize.
No network access is needed to normalise (smp's ``get_preprocessing_params`` may call the hub).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ptxseg.config import Config, ModelConfig, load_run_config
from ptxseg.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegModel(nn.Module):
    """Normalisation + an smp segmentation network.

    Shape:
        - input: ``(B, 1, H, W)``, any dtype, values in [0, 255] (H, W multiples of 32)
        - output: ``(B, 1, H, W)`` float logits
    """

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * (1.0 / 255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return self.net(x)


def available_architectures() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", None)
    if mapping is None:  # pragma: no cover - older smp
        mapping = {
            "unet": smp.Unet,
            "unetplusplus": smp.UnetPlusPlus,
            "fpn": smp.FPN,
            "deeplabv3plus": smp.DeepLabV3Plus,
        }
    return {k.lower(): v for k, v in mapping.items()}


def available_encoders() -> list[str]:
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.get_encoder_names())


def _timm_universal(name: str) -> bool:
    """smp's ``tu-NAME`` encoders: any timm model ``NAME`` (e.g. ``tu-tf_efficientnet_lite0``)."""
    import timm

    return name.startswith("tu-") and timm.is_model(name[3:])


def build_model(cfg: ModelConfig, *, pretrained: bool = True) -> SegModel:
    """Build ``SegModel`` from the model section of the config.

    Args:
        cfg: ``arch`` (any smp architecture), ``encoder`` (any smp encoder),
            ``encoder_weights`` (``imagenet``, ``None``, or a local weights file).
        pretrained: ``False`` skips loading encoder weights (when a checkpoint follows).
    """
    archs = available_architectures()
    arch = cfg.arch.lower()
    if arch not in archs:
        raise ConfigError(
            f"model.arch: unknown architecture '{cfg.arch}' (valid: {', '.join(sorted(archs))})"
        )
    encoders = available_encoders()
    if cfg.encoder not in encoders and not _timm_universal(cfg.encoder):
        raise ConfigError(
            f"model.encoder: unknown encoder '{cfg.encoder}' (valid: {', '.join(encoders)}, "
            "or tu-NAME for a timm model NAME)"
        )
    weights = cfg.encoder_weights if pretrained else None
    local_file: Path | None = None
    if weights is not None and (
        Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors") or Path(weights).exists()
    ):
        local_file = Path(weights)
        weights = None
    try:
        net = archs[arch](
            encoder_name=cfg.encoder, encoder_weights=weights, in_channels=3, classes=1
        )
    except KeyError as exc:
        raise ConfigError(
            f"model.encoder_weights: '{cfg.encoder_weights}' is not available for "
            f"{cfg.encoder} ({exc})"
        ) from None
    except (OSError, ConnectionError) as exc:
        raise ConfigError(
            f"model.encoder_weights: could not download '{cfg.encoder_weights}' weights for "
            f"{cfg.encoder} ({type(exc).__name__}); offline, set encoder_weights to a local file "
            "(see README: offline pretrained weights) or null"
        ) from None
    report = None
    if local_file is not None:
        from ptxseg.weights import load_encoder_file  # names mapped, sha256, loaded/skipped

        report = load_encoder_file(net.encoder, local_file, name=cfg.encoder)
    if cfg.bn_momentum is not None:
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.bn_momentum
    model = SegModel(net)
    model.encoder_weights_report = report  # ptxseg.weights.WeightsReport or None
    return model


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy pickle format


def _is_onnx(path: Path, head: bytes) -> bool:
    """An ONNX model (a ModelProto: field 1, ir_version, comes first), by name or content."""
    if path.suffix.lower() == ".onnx":
        return True
    if not head.startswith(b"\x08"):
        return False
    try:
        import onnx

        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything that does not parse is not ONNX
        return False
    return len(proto.graph.node) > 0


def _torch_load(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(f"{path}: truncated or not a checkpoint (empty file)")
    if not head.startswith(_TORCH_MAGIC):
        if _is_onnx(path, head):
            raise CheckpointError(
                f"{path}: is an ONNX model, not a checkpoint (use --backend onnx)"
            )
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (ptxseg checkpoints are torch.save files: "
            "best.ckpt, last.ckpt)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refusing to load: the checkpoint carries pickled objects that are not "
                "plain weights (loaded with weights_only=True)"
            ) from None
        raise CheckpointError(f"{path}: not a valid checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no state_dict)")
    return obj


def model_state_from_checkpoint(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """Extract SegModel weights from a Lightning checkpoint (keys ``model.*``), tolerating the
    ``_orig_mod.`` infix that ``torch.compile`` adds."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no state_dict)")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith("model."):
            continue
        key = key.removeprefix("model.").replace("_orig_mod.", "")
        out[key] = value
    if not out:
        raise CheckpointError(f"{path}: not a ptxseg checkpoint (no model weights)")
    return out


def load_model(cfg: Config, ckpt_path: str | Path) -> SegModel:
    """Build the model of ``cfg`` and load the weights of a checkpoint into it (eval mode).

    Raises:
        CheckpointError: missing, truncated or unsafe file, an ONNX model, weights that do not
            match the config, or non-finite weights (:func:`check_finite`).
    """
    path = Path(ckpt_path)
    obj = _torch_load(path)
    state = model_state_from_checkpoint(obj, path)
    model = build_model(cfg.model, pretrained=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        sample = (missing or unexpected)[0]
        raise CheckpointError(
            f"{path}: does not match the config (model.arch={cfg.model.arch}, "
            f"model.encoder={cfg.model.encoder}): {len(missing)} missing and "
            f"{len(unexpected)} unexpected weights, e.g. '{sample}'"
        )
    bad = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"{path}: does not match the config (model.encoder={cfg.model.encoder}): "
            f"{len(bad)} weights of another shape, e.g. '{bad[0]}' "
            f"{tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}"
        )
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, a corrupt file), naming the
    checkpoint and the first bad tensor: no stage may compute from them."""
    for key, value in state.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            n_bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{path}: refusing to load: weight '{key}' holds {n_bad} non-finite value"
                f"{'s' * (n_bad != 1)} (NaN or inf; the training diverged or the file is "
                "corrupt)"
            )


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[SegModel, Config]:
    """The model and config of a run folder (``best.ckpt`` by default, or ``last``)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    return load_model(cfg, run_dir / f"{which}.ckpt"), cfg


def save_model_checkpoint(model: SegModel, path: str | Path) -> None:
    """Save weights in the same layout as the training checkpoints (``state_dict`` with
    ``model.`` keys), atomically. Used by tests and tools that build a run folder by hand."""
    from ptxseg.fileio import atomic_open

    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as fh:
        torch.save({"state_dict": state}, fh)


def init_checkpoint(value: str | Path) -> Path:
    """The checkpoint ``model.init_from`` names: a run folder's ``best.ckpt``, or a file."""
    path = Path(value)
    if path.is_dir():
        ckpt = path / "best.ckpt"
        if not ckpt.is_file():
            raise CheckpointError(f"model.init_from: {path}: run folder without best.ckpt")
        return ckpt
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path}: no such run folder or checkpoint file")
    return path


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_init_weights(cfg: Config) -> tuple[dict[str, torch.Tensor], Path, str]:
    """The weights ``cfg.model.init_from`` points at (fine-tuning), read with the same safe
    loader as every checkpoint (``weights_only=True``) and checked against ``cfg``'s
    architecture. Returns the ``SegModel`` state dict, the checkpoint path and its sha256.

    Raises:
        ConfigError: no such run folder/file, or a source run of another arch/encoder.
        CheckpointError: unreadable/unsafe checkpoint, or weights that do not fit the model.
    """
    if cfg.model.init_from is None:
        raise ValueError("load_init_weights: model.init_from is not set")
    source = Path(cfg.model.init_from)
    ckpt = init_checkpoint(source)
    if source.is_dir() and (source / "config.yaml").is_file():
        theirs = load_run_config(source).model
        for key in ("arch", "encoder"):
            a, b = getattr(theirs, key), getattr(cfg.model, key)
            if a.lower() != b.lower():
                raise ConfigError(
                    f"model.init_from: {source} was trained with model.{key}={a}, this run "
                    f"has model.{key}={b}; fine-tuning needs the same architecture and encoder"
                )
    try:
        model = load_model(cfg, ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"model.init_from: {exc}") from None
    return model.state_dict(), ckpt, file_sha256(ckpt)
