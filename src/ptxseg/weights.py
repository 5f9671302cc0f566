"""Local encoder weights: read a weights file, match its tensors to the encoder, load, report.

``model.encoder_weights: PATH`` accepts, for the architecture of ``model.encoder``:

- smp's own encoder state dicts (``torch.save(net.encoder.state_dict(), PATH)``);
- files saved by the EfficientNet-PyTorch port (``efficientnet-b4-6ed6700e.pth``, the file smp
  itself downloads for ``efficientnet-b4``, or ``efficientnet-lite0-57934424.pth``), whose
  names are ``_conv_stem``, ``_blocks.N._depthwise_conv``, ... ``_fc``;
- files saved by timm (``conv_stem``, ``blocks.S.J.conv_dw``, ... ``classifier``), also timm
  training checkpoints (``state_dict`` inside) and ``.safetensors`` files.

Tensors are matched in one of three ways, tried in this order (``num_batches_tracked``
counters are carried where both sides have them and are not counted as tensors):

1. **names**: file and encoder use the same naming (after dropping ``module.``, ``encoder.``
   and ``model.`` prefixes: smp's ``tu-*`` encoders keep timm's model under ``model.``). This
   covers smp's own files, EfficientNet-PyTorch files into smp's ``efficientnet-b*`` encoders
   (smp's port keeps the names), and timm files into ``tu-*`` / ``timm-*`` encoders.
2. **table** (:data:`EFFNET_PYTORCH_TO_TIMM`): EfficientNet-PyTorch names <-> timm names, in
   either direction (an EfficientNet-PyTorch file into ``tu-efficientnet_lite0``, a timm file
   into smp's ``efficientnet-b*``). The N-th ``_blocks.N`` is the N-th ``blocks.S.J`` in
   order; inside a block the table depends on whether it has an expansion conv (timm's
   ``InvertedResidual``) or not (``DepthwiseSeparableConv``).
3. **order and shape**, for any other naming: the encoder's tensors and the file's are paired
   in order and must have the same shapes one by one; tensors left over at the end of the
   file (a classifier) are skipped.

Every encoder tensor must receive a tensor of the same shape. File tensors the encoder has no
place for are skipped only when they are the network's head (the classifier ``_fc`` /
``classifier``, and ``_conv_head`` / ``_bn1`` / ``conv_head`` / ``bn2``, which smp's ``tu-*``
encoders drop); any other difference refuses the file with a
:class:`~ptxseg.errors.ConfigError` naming the file, the number of unmatched tensors on each
side and the first few names. A file holding a NaN or an infinity in any tensor is refused
too, naming the tensor (:func:`nonfinite`): training from it could only give NaN. Nothing is
loaded from a refused file; only a regular file is read (a folder or a FIFO is named so).

:func:`load_encoder_file` returns a :class:`WeightsReport` (file, sha256, method, tensors
loaded and skipped), whose :meth:`WeightsReport.summary` is the line ``ptxseg train`` prints
and whose :meth:`WeightsReport.to_dict` is the run's ``weights.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptxseg.errors import ConfigError

#: EfficientNet-PyTorch (lukemelas; smp's ``efficientnet-b*``) -> timm, outside the blocks
EFFNET_PYTORCH_TO_TIMM_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

#: inside block N (``_blocks.N`` -> the N-th ``blocks.S.J``), for blocks with an expansion
#: conv (timm ``InvertedResidual``) and without one (timm ``DepthwiseSeparableConv``)
EFFNET_PYTORCH_TO_TIMM_BLOCK = {
    "expand": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    "no_expand": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
}

#: the whole table, as documented above (also in docs/accuracy.md)
EFFNET_PYTORCH_TO_TIMM = {
    "stem_head": EFFNET_PYTORCH_TO_TIMM_STEM_HEAD,
    "block": EFFNET_PYTORCH_TO_TIMM_BLOCK,
}

#: top-level modules of a classification network that a segmentation encoder may lack
HEAD_MODULES = frozenset(
    {"_fc", "_conv_head", "_bn1", "classifier", "conv_head", "bn2", "fc", "head"}
)

_PREFIXES = ("module.", "encoder.", "model.", "_orig_mod.")
_COUNTER = "num_batches_tracked"
_SHOW = 4  # names listed in a refusal


@dataclass
class WeightsReport:
    """What :func:`load_encoder_file` loaded.

    Attributes:
        file: the weights file (as given). sha256: its hex digest.
        encoder: the smp encoder name. method: ``names``, ``table`` or ``order and shape``.
        loaded: number of tensors loaded (``num_batches_tracked`` counters not counted).
        total: number of tensors in the file. skipped: file tensors not loaded (the head).
    """

    file: str
    sha256: str
    encoder: str
    method: str
    loaded: int
    total: int
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"encoder weights {Path(self.file).name} (sha256 {self.sha256[:12]}): loaded "
            f"{self.loaded} of {self.total} tensors into {self.encoder} "
            f"(matched by {self.method})"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} not in the encoder: {_names(self.skipped)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(Path(self.file).resolve()),
            "sha256": self.sha256,
            "encoder": self.encoder,
            "method": self.method,
            "loaded": self.loaded,
            "total": self.total,
            "skipped": list(self.skipped),
            "summary": self.summary(),
        }


def _names(names: list[str], n: int = _SHOW) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... (+{len(names) - n})" if len(names) > n else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``torch.save`` with ``weights_only`` or ``.safetensors``;
    a checkpoint's ``state_dict`` / ``model`` entry when the file wraps one).

    Raises:
        ConfigError: missing file, not a regular file (a folder, a FIFO...), unreadable file,
            no tensors in it, or a tensor holding NaN or infinity.
    """
    from ptxseg.errors import DataError
    from ptxseg.fileio import open_regular

    path = Path(path)
    where = f"model.encoder_weights: {path}"
    try:
        fh = open_regular(path)
    except DataError as exc:
        raise ConfigError(f"{where}: {exc.problem}") from None
    try:
        with fh:
            if path.suffix == ".safetensors":
                from safetensors.torch import load

                obj: Any = load(fh.read())
            else:
                obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user problem
        raise ConfigError(f"{where}: not a readable weights file ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: not a state dict ({type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"{where}: holds no tensors")
    bad = nonfinite(state)
    if bad is not None:
        name, count = bad
        raise ConfigError(
            f"{where}: refusing to load: tensor '{name}' holds {count} non-finite value"
            f"{'s' * (count != 1)} (NaN or inf: the file is corrupt or its training diverged)"
        )
    return state


def nonfinite(state: dict[str, Any]) -> tuple[str, int] | None:
    """The first floating-point tensor of ``state`` that holds NaN or infinity, and how many
    such values it holds; ``None`` when every value is finite."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                return key, int((~finite).sum())
    return None


def _canonical(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _naming(names: list[str]) -> str:
    """``effnet-pytorch``, ``timm`` or ``other``."""
    if any(n.startswith(("_blocks.", "_conv_stem.")) for n in names):
        return "effnet-pytorch"
    if any(n.startswith("conv_stem.") for n in names) and any(
        re.match(r"blocks\.\d+\.\d+\.", n) for n in names
    ):
        return "timm"
    return "other"


def _effnet_pytorch_to_timm(ep_names: list[str], timm_names: list[str]) -> dict[str, str]:
    """EfficientNet-PyTorch name -> timm name by :data:`EFFNET_PYTORCH_TO_TIMM` (names the
    table cannot place are left out)."""
    timm_blocks: list[str] = []
    for n in timm_names:
        m = re.match(r"(blocks\.\d+\.\d+)\.", n)
        if m and m.group(1) not in timm_blocks:
            timm_blocks.append(m.group(1))
    timm_blocks.sort(key=lambda b: tuple(int(x) for x in b.split(".")[1:]))
    expands = {
        int(m.group(1)) for n in ep_names if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", n))
    }
    out: dict[str, str] = {}
    for name in ep_names:
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", name)
        if m:
            index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = EFFNET_PYTORCH_TO_TIMM_BLOCK["expand" if index in expands else "no_expand"]
            if index < len(timm_blocks) and module in table:
                out[name] = f"{timm_blocks[index]}.{table[module]}.{leaf}"
            continue
        module, _, leaf = name.partition(".")
        if module in EFFNET_PYTORCH_TO_TIMM_STEM_HEAD:
            out[name] = f"{EFFNET_PYTORCH_TO_TIMM_STEM_HEAD[module]}.{leaf}"
    return out


def _shape_mismatches(pairs, tgt, src, target, source) -> list[str]:
    """``'encoder name (shape) <- file name (shape)'`` for each pair of different shapes."""
    return [
        f"{tgt[t]} {tuple(target[tgt[t]].shape)} <- {src[s]} {tuple(source[src[s]].shape)}"
        for t, s in pairs.items()
        if target[tgt[t]].shape != source[src[s]].shape
    ]


def _is_head(name: str) -> bool:
    return name.split(".", 1)[0] in HEAD_MODULES


def match_tensors(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, str], list[str], str]:
    """Pair every target tensor with a source tensor of the same shape.

    Args:
        source: the file's state dict. target: the encoder's state dict.
        where: the file, for error messages.

    Returns:
        ``(mapping target name -> source name, skipped source names, method)``;
        ``num_batches_tracked`` counters are not in the mapping.

    Raises:
        ConfigError: an encoder tensor without a counterpart of the same shape, or a file
            tensor outside the head that the encoder has no place for.
    """
    src = {_canonical(k): k for k in source if not k.endswith(_COUNTER)}
    tgt = {_canonical(k): k for k in target if not k.endswith(_COUNTER)}
    s_naming, t_naming = _naming(list(src)), _naming(list(tgt))
    pairs: dict[str, str] = {}  # canonical target -> canonical source
    if s_naming == t_naming != "other" or (
        "other" in (s_naming, t_naming) and set(tgt) <= set(src)
    ):
        method = "names"
        pairs = {t: t for t in tgt if t in src}
    elif {s_naming, t_naming} == {"effnet-pytorch", "timm"}:
        method = "table (EfficientNet-PyTorch <-> timm names)"
        if s_naming == "effnet-pytorch":
            pairs = {t: s for s, t in _effnet_pytorch_to_timm(list(src), list(tgt)).items()}
        else:
            pairs = dict(_effnet_pytorch_to_timm(list(tgt), list(src)).items())
        pairs = {t: s for t, s in pairs.items() if t in tgt and s in src}
    else:
        method = "order and shape"
        s_list, t_list = list(src), list(tgt)
        for t, s in zip(t_list, s_list, strict=False):
            pairs[t] = s
        extra = s_list[len(t_list) :]
        bad = _shape_mismatches(pairs, tgt, src, target, source)
        missing = [tgt[t] for t in t_list[len(s_list) :]]
        if bad or missing:
            raise ConfigError(
                f"{where}: does not match the encoder (paired by order and shape): "
                f"{len(bad)} tensors of another shape"
                + (f" ({_names(bad)})" if bad else "")
                + f", {len(missing)} encoder tensors without a counterpart"
                + (f" ({_names(missing)})" if missing else "")
            )
        return {tgt[t]: src[s] for t, s in pairs.items()}, [src[s] for s in extra], method

    missing = [tgt[t] for t in tgt if t not in pairs]
    used = set(pairs.values())
    unplaced = [s for s in src if s not in used]
    extra = [src[s] for s in unplaced if not _is_head(s)]
    bad = _shape_mismatches(pairs, tgt, src, target, source)
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder tensors not in the file ({_names(missing)})")
        if extra:
            parts.append(f"{len(extra)} file tensors not in the encoder ({_names(extra)})")
        if bad:
            parts.append(f"{len(bad)} tensors of another shape ({_names(bad)})")
        raise ConfigError(f"{where}: does not match the encoder ({method}): " + "; ".join(parts))
    mapping = {tgt[t]: src[s] for t, s in pairs.items()}
    return mapping, [src[s] for s in unplaced], method


def _counters(
    mapping: dict[str, str], source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, str]:
    """``num_batches_tracked`` of each BatchNorm whose running_mean is mapped."""
    out = {}
    for t, s in mapping.items():
        if t.endswith(".running_mean"):
            tc = t.removesuffix("running_mean") + _COUNTER
            sc = s.removesuffix("running_mean") + _COUNTER
            if tc in target and sc in source:
                out[tc] = sc
    return out


def load_encoder_file(encoder: nn.Module, path: str | Path, *, name: str = "") -> WeightsReport:
    """Load a local weights file into an smp encoder (``net.encoder``), all or nothing.

    Args:
        encoder: the encoder module. path: the weights file.
        name: the smp encoder name (for messages and the report).

    Returns:
        The :class:`WeightsReport` (sha256, method, tensors loaded / skipped).

    Raises:
        ConfigError: missing or unreadable file, or a file that does not match the encoder
            (the message names the unmatched tensors); the encoder is then left untouched.
    """
    path = Path(path)
    source = read_state_dict(path)
    target = encoder.state_dict()
    where = f"model.encoder_weights: {path}" + (f" (encoder {name})" if name else "")
    mapping, skipped, method = match_tensors(source, target, where)
    from ptxseg.fileio import sha256_file

    state = dict(target)
    for t, s in {**mapping, **_counters(mapping, source, target)}.items():
        state[t] = source[s].to(dtype=target[t].dtype)
    # nn.Module's own method: smp's timm encoders override load_state_dict
    nn.Module.load_state_dict(encoder, state, strict=True)
    total = sum(1 for k in source if not k.endswith(_COUNTER))
    return WeightsReport(
        file=str(path),
        sha256=sha256_file(path),
        encoder=name or type(encoder).__name__,
        method=method,
        loaded=len(mapping),
        total=total,
        skipped=skipped,
    )
