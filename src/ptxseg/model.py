"""Build the network from the config.

The network is wrapped in :class:`SegModel`, which takes raw gray radiographs (values in
[0, 255], one channel) and does the normalisation itself: the mean/std its encoder weights
expect (:mod:`ptxseg.normalization`) after repeating the gray channel three times. The data
pipeline therefore ships uint8 to the device (4x less transfer than float32), and an exported
ONNX graph needs no preprocessing beyond a resize. Reading and writing checkpoints:
:mod:`ptxseg.checkpoint`; downloadable encoder weights are checked first (:mod:`ptxseg.hub`:
the cache, else one quick error where they cannot be downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

from ptxseg.config import ModelConfig
from ptxseg.errors import ConfigError
from ptxseg.hub import require_weights
from ptxseg.normalization import IMAGENET, Normalization, for_weights, weights_file


class SegModel(nn.Module):
    """Normalisation + an smp segmentation network.

    Shape:
        - input: ``(B, 1, H, W)``, any dtype, values in [0, 255] (H, W multiples of 32)
        - output: ``(B, 1, H, W)`` float logits
    """

    def __init__(self, net: nn.Module, normalization: Normalization = IMAGENET):
        super().__init__()
        self.net = net
        self.normalization = normalization  # the exact values (the buffers are float32)
        for name in ("mean", "std"):
            values = torch.tensor(getattr(normalization, name), dtype=torch.float32)
            self.register_buffer(name, values.view(1, 3, 1, 1), persistent=False)

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


def build_model(
    cfg: ModelConfig, *, pretrained: bool = True, normalization: Normalization | None = None
) -> SegModel:
    """Build ``SegModel`` from the model section of the config.

    Args:
        cfg: ``arch`` (any smp architecture), ``encoder`` (any smp encoder),
            ``encoder_weights`` (``imagenet``, ``None``, or a local weights file).
        pretrained: ``False`` skips loading encoder weights (when a checkpoint follows).
        normalization: the mean/std to apply; default: the ones ``cfg``'s encoder weights
            expect (:func:`ptxseg.normalization.for_weights`), whether loaded or not.
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
    if normalization is None:
        normalization = for_weights(cfg.encoder, cfg.encoder_weights, cfg.encoder_weights_kind)
    weights = cfg.encoder_weights if pretrained else None
    local_file = weights_file(weights)
    if local_file is not None:
        weights = None
    try:
        with require_weights(cfg.encoder, weights):  # cached, or one quick error offline
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
    model = SegModel(net, normalization)
    model.encoder_weights_report = report  # ptxseg.weights.WeightsReport or None
    return model
