"""The one rule that turns a probability map into a binary mask, used by tune, evaluate and
predict alike (never re-implemented elsewhere).

Two modes:

- ``pixel`` (the paper): pixels with ``probs > binary_threshold``, then connected components
  (8-connectivity) smaller than ``removal_area`` pixels are removed.
- ``triplet`` (the SIIM-ACR winners): the image is called empty unless at least ``min_area``
  pixels exceed ``top_threshold``; otherwise its mask is the pixels above ``bottom_threshold``.

Areas are counted in pixels at MODEL resolution (``size`` x ``size``). When the probabilities
have been resized back to an image's native (H, W), pass ``area_scale = H*W / size**2``
(see :func:`area_scale`) so the same physical fraction of the image is removed.

``thresholds.json`` keeps the paper's keys (``binary_threshold``, ``removal_area``) at the top
level in pixel mode, plus ``mode`` and ``size``; the tuner adds ``objective``, ``score`` and the
grid's table beside them.

Which rule a run uses is the run folder's business (:meth:`ptxseg.run.Run.thresholds`): a
given file, else the run's tuned one, else :data:`DEFAULT_PARAMS` (``probs > 0.5``, no
component removal) with a warning.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from ptxseg.choices import Choice
from ptxseg.errors import DataError
from ptxseg.fileio import read_json, write_text

CONNECTIVITY = 8


class Mode(Choice):
    """The post-processing rule (``--mode``)."""

    PIXEL = "pixel"
    TRIPLET = "triplet"


@dataclass(frozen=True)
class PostParams:
    """Post-processing parameters.

    Args:
        mode: ``"pixel"`` or ``"triplet"``.
        binary_threshold: pixel mode: probability above which a pixel is positive.
        removal_area: pixel mode: components with fewer pixels (at model resolution) are removed;
            0 keeps everything.
        top_threshold: triplet mode: the "is there a lesion" threshold.
        min_area: triplet mode: pixels above ``top_threshold`` needed to call the image positive.
        bottom_threshold: triplet mode: the threshold that draws the mask of a positive image.
        size: the model resolution the areas refer to (``None`` = the probabilities' own).
    """

    mode: Literal["pixel", "triplet"] = "pixel"
    binary_threshold: float = 0.5
    removal_area: int = 0
    top_threshold: float = 0.5
    min_area: int = 0
    bottom_threshold: float = 0.5
    size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in Mode.values():
            raise ValueError(f"mode: unknown '{self.mode}' (valid: {', '.join(Mode.values())})")
        for name in ("binary_threshold", "top_threshold", "bottom_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: must be a number in [0, 1] (got {v!r})")
        for name in ("removal_area", "min_area"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name}: must be a non-negative integer (got {v!r})")
        if self.size is not None and not (isinstance(self.size, int) and self.size > 0):
            raise ValueError(f"size: must be a positive integer (got {self.size!r})")

    def to_dict(self) -> dict[str, Any]:
        """The keys that describe this rule (only the active mode's), paper keys first."""
        if self.mode == "pixel":
            out: dict[str, Any] = {
                "binary_threshold": self.binary_threshold,
                "removal_area": self.removal_area,
            }
        else:
            out = {
                "top_threshold": self.top_threshold,
                "min_area": self.min_area,
                "bottom_threshold": self.bottom_threshold,
            }
        out["mode"] = self.mode
        out["size"] = self.size
        return out

    def describe(self) -> str:
        """The rule in words, e.g. ``probs > 0.4, remove components < 64 px (areas at 128 px)``
        or ``probs > 0.5, no component removal``."""
        if self.mode == "pixel":
            removal = (
                f"remove components < {self.removal_area} px"
                if self.removal_area > 0
                else "no component removal"
            )
            s = f"probs > {self.binary_threshold:g}, {removal}"
            has_area = self.removal_area > 0
        else:
            gate = (
                f">= {self.min_area} px > {self.top_threshold:g}"
                if self.min_area > 1
                else f"a pixel > {self.top_threshold:g}"
            )
            s = f"empty unless {gate}, then probs > {self.bottom_threshold:g}"
            has_area = self.min_area > 1
        return s + (f" (areas at {self.size} px)" if self.size and has_area else "")


#: the rule of a run that was never tuned (no thresholds.json): evaluate and predict alike
DEFAULT_PARAMS = PostParams(mode="pixel", binary_threshold=0.5, removal_area=0)
DEFAULT_SOURCE = "default"


def with_model_size(params: PostParams, size: int) -> PostParams:
    """``params`` with ``size`` filled in when the file did not say (a hand-written
    ``{"binary_threshold": .., "removal_area": ..}``): areas are at the model's resolution."""
    return params if params.size is not None else replace(params, size=size)


def area_scale(params: PostParams, height: int, width: int) -> float:
    """The factor that converts model-resolution areas to an (height, width) map."""
    if params.size is None:
        return 1.0
    return (height * width) / float(params.size * params.size)


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop the 8-connected components of a uint8 {0,1} mask with fewer than ``min_pixels``."""
    if min_pixels <= 0 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=CONNECTIVITY)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # background
    if keep[1:n].all():
        return mask
    return keep[labels].astype(np.uint8)


def binarize(probs: np.ndarray, params: PostParams, *, area_scale: float = 1.0) -> np.ndarray:
    """Apply the post-processing rule to one probability map.

    Args:
        probs: probabilities in [0, 1].
        params: the rule (see :class:`PostParams`).
        area_scale: multiply the rule's areas by this (``H*W / size**2`` at native resolution).

    Shape:
        - probs: ``(H, W)`` float
        - output: ``(H, W)`` uint8 in {0, 1}
    """
    if probs.ndim != 2:
        raise ValueError(f"binarize expects a (H, W) map, got shape {probs.shape}")
    if params.mode == "pixel":
        mask = (probs > params.binary_threshold).view(np.uint8)
        return remove_small_components(np.ascontiguousarray(mask), params.removal_area * area_scale)
    n_top = int(np.count_nonzero(probs > params.top_threshold))
    if n_top == 0 or n_top < params.min_area * area_scale:
        return np.zeros(probs.shape, dtype=np.uint8)
    return (probs > params.bottom_threshold).view(np.uint8)


def save_params(params: PostParams, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``thresholds.json``: the rule's keys first, then ``extra`` (objective, score,
    grid...), atomically."""
    obj = params.to_dict()
    for key, value in (extra or {}).items():
        if key not in obj:
            obj[key] = value
    write_text(path, _dumps(obj))


def _dumps(obj: Any) -> str:
    """Indented JSON with each innermost list (a grid row) on one line."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    # inside JSON strings newlines are escaped, so a newline is always formatting
    return re.sub(
        r"\[\n\s*([^\[\]{}]*?)\n\s*\]",
        lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]",
        text,
    ) + "\n"


def params_from_dict(obj: Any, source: str = "thresholds") -> PostParams:
    """Build :class:`PostParams` from a ``thresholds.json`` mapping (extra keys are ignored;
    a file with only ``binary_threshold``/``removal_area`` is pixel mode)."""
    if not isinstance(obj, dict):
        raise DataError(source, "not a thresholds file (expected a JSON object)")
    mode = obj.get("mode", "pixel")
    if mode not in Mode.values():
        raise DataError(source, f"'mode': unknown '{mode}' (valid: {', '.join(Mode.values())})")
    needed = (
        ("binary_threshold",)
        if mode == "pixel"
        else ("top_threshold", "min_area", "bottom_threshold")
    )
    missing = [k for k in needed if k not in obj]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise DataError(source, f"missing key{plural} {', '.join(missing)}")
    kwargs: dict[str, Any] = {"mode": mode, "size": obj.get("size")}
    keys = ("binary_threshold", "removal_area") if mode == "pixel" else needed
    for key in keys:
        if key in obj:
            value = obj[key]
            if key in ("removal_area", "min_area") and isinstance(value, float):
                value = int(value) if value.is_integer() else value
            kwargs[key] = value
    try:
        return PostParams(**kwargs)
    except ValueError as exc:
        raise DataError(source, str(exc)) from None


def load_params(path: str | Path) -> PostParams:
    """Read a ``thresholds.json`` written by ``ptxseg tune`` (or by hand)."""
    path = Path(path)
    obj = read_json(
        path, "thresholds file", missing="thresholds file not found (run `ptxseg tune RUN` first)"
    )
    return params_from_dict(obj, str(path))
