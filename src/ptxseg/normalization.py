"""The normalisation a pretrained encoder expects, keyed by (encoder, weights).

Pretrained weights were trained on inputs normalised one way, and fine-tuning works best when
the model sees its inputs normalised the same way: ImageNet mean/std for most encoders, 0.5/0.5
for EfficientNet's ``advprop`` weights, the Inception-family encoders and EfficientNet-lite,
and DPN's own constants. smp 0.6 keeps these values only in the ``config.json`` of each
weights repository on the Hugging Face hub (its ``pretrained_settings`` hold the repository
name alone), so :data:`TABLE` is ptxseg's own, written from the values smp documented for
each (encoder, weights) before 0.5 (they agree with timm's pretrained configs); the weights an
encoder has come from smp's own registry, read without the network. ``tu-`` encoders (timm
models through smp) take the mean/std of timm's local pretrained config.

Which row applies:

- ``encoder_weights`` a name (``imagenet``, ``advprop``, ...): that row;
- ``encoder_weights`` a local file (:func:`weights_file`): ``model.encoder_weights_kind`` names
  the weights the file holds (default ``imagenet``);
- ``encoder_weights: null`` (random initialisation): ImageNet's mean/std, which is what every
  ptxseg model used before the table existed;

an (encoder, weights) pair outside the table is refused, listing the weights it knows for that
encoder. The values go into every checkpoint (:mod:`ptxseg.model`) and every ONNX export, so a
model never depends on this table after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ptxseg.errors import ConfigError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 - mean) / std`` on RGB inputs (gray replicated to 3 channels)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Inception / advprop / EfficientNet-lite
DPN = Normalization((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3)

#: (encoder patterns, weights names, normalisation): these encoders with these weights were
#: trained with that normalisation; the first matching row applies
TABLE: tuple[tuple[tuple[str, ...], tuple[str, ...], Normalization], ...] = (
    (("efficientnet-b*", "timm-efficientnet-*"), ("advprop",), HALF),
    (("inceptionresnetv2", "inceptionv4"), ("imagenet", "imagenet+background"), HALF),
    (("timm-tf_efficientnet_lite*", "xception"), ("imagenet",), HALF),
    (("dpn*",), ("imagenet", "imagenet+5k"), DPN),
    (("*",), ("imagenet", "ssl", "swsl", "instagram", "noisy-student", "noisy-student-475"),
     IMAGENET),  # fmt: skip
)

#: the weights names of the table (``model.encoder_weights_kind``)
WEIGHT_NAMES: tuple[str, ...] = tuple(dict.fromkeys(w for _, names, _ in TABLE for w in names))


def weights_file(value: str | None) -> Path | None:
    """The local file ``model.encoder_weights`` names (a weights suffix, or an existing
    path), else ``None`` (a weights name such as ``imagenet``, or null)."""
    if value is None:
        return None
    path = Path(value)
    return path if path.suffix in WEIGHT_FILE_SUFFIXES or path.exists() else None


def _smp_weights(encoder: str) -> tuple[str, ...]:
    """The pretrained weights smp's registry lists for ``encoder`` (no network)."""
    from segmentation_models_pytorch.encoders import encoders

    entry = encoders.get(encoder)
    return tuple(entry["pretrained_settings"]) if entry else ()


def _timm(encoder: str) -> Normalization:
    import timm

    cfg = timm.models.get_pretrained_cfg(encoder.removeprefix("tu-"))
    if cfg is None or cfg.mean is None or cfg.std is None:
        raise ConfigError(f"model.encoder: timm has no pretrained config for '{encoder}'")
    return Normalization(tuple(cfg.mean), tuple(cfg.std))  # type: ignore[arg-type]


def _row(encoder: str, weights: str) -> Normalization | None:
    return next(
        (norm for patterns, names, norm in TABLE
         if weights in names and any(fnmatchcase(encoder, p) for p in patterns)),
        None,
    )  # fmt: skip


def lookup(encoder: str, weights: str) -> Normalization:
    """The row of (``encoder``, ``weights``), for weights smp's registry has for ``encoder``.

    Raises:
        ConfigError: a pair outside the table or the registry, listing the weights known for
            ``encoder``.
    """
    if encoder.startswith("tu-"):
        return _timm(encoder)
    known = [w for w in _smp_weights(encoder) if _row(encoder, w) is not None]
    if weights in known:
        return _row(encoder, weights)  # type: ignore[return-value]
    raise ConfigError(
        f"model.encoder_weights: no normalisation known for {encoder} with '{weights}' weights "
        f"(known for {encoder}: {', '.join(known) or 'none'})"
    )


def for_weights(encoder: str, weights: str | None, kind: str = "imagenet") -> Normalization:
    """The normalisation of a model config's encoder and weights (see the module doc)."""
    if weights is None:
        return IMAGENET
    return lookup(encoder, kind if weights_file(weights) is not None else weights)
