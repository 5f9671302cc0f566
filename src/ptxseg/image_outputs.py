"""The files one predicted image gives: ``masks/<id>.png`` ({0, 255}, native size),
``overlays/<id>.png`` (the radiograph with the predicted region tinted and outlined in red,
longest side capped at :data:`OVERLAY_MAX_SIDE`; a plain gray copy when nothing is predicted),
its ``results.csv`` row and, for a submission, its Kaggle row (``-1`` for an empty mask).

The mask is the one :func:`ptxseg.postprocess.binarize` of tune and evaluate, applied to the
probabilities resized back to the image's native size, with areas scaled by
:func:`ptxseg.postprocess.area_scale`; ``max_prob`` is taken at model resolution, as in
evaluate's ``per_image.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ptxseg.data.resize import probs_to_native
from ptxseg.data.rle import encode
from ptxseg.errors import PtxsegError, printable
from ptxseg.figures import shrink_to
from ptxseg.fileio import write_png
from ptxseg.kaggle import kaggle_image_id
from ptxseg.postprocess import PostParams, area_scale, binarize

if TYPE_CHECKING:
    from ptxseg.data.dataset import Item

MASKS = "masks"
OVERLAYS = "overlays"
RESULTS_COLUMNS = (
    "id",
    "source",
    "height",
    "width",
    "has_pneumothorax",
    "area_px",
    "area_fraction",
    "max_prob",
    "status",
)
OVERLAY_MAX_SIDE = 1024  # overlays are for looking at; masks keep the full native size
OVERLAY_ALPHA = 0.35
OVERLAY_BGR = (40, 40, 255)  # red, as the prediction contours of the evaluation report


def draw_prediction(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The radiograph with the predicted region tinted and outlined (BGR, for PNG writing);
    with an empty mask, the radiograph itself (one channel: a third of the PNG encoding).

    Shape:
        - image: ``(H, W)`` uint8; mask: ``(H, W)`` {0, 1}
        - output: ``(h, w, 3)`` uint8 (``(h, w)`` when the mask is empty), longest side at
          most :data:`OVERLAY_MAX_SIDE`
    """
    image, mask = shrink_to(OVERLAY_MAX_SIDE, image, mask)
    if not mask.any():
        return np.ascontiguousarray(image)
    mask = mask.astype(np.uint8, copy=False)
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    tint = np.empty_like(bgr)
    tint[:] = OVERLAY_BGR
    blended = cv2.addWeighted(bgr, 1.0 - OVERLAY_ALPHA, tint, OVERLAY_ALPHA, 0.0)
    cv2.copyTo(blended, mask, bgr)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(bgr.shape[:2]) / 400))
    cv2.drawContours(bgr, contours, -1, OVERLAY_BGR, thickness)
    return bgr


@dataclass
class ImageResult:
    """One row of results.csv (and of the Kaggle CSV when ``rle`` is set)."""

    id: str
    source: str
    height: int = 0
    width: int = 0
    has_pneumothorax: bool | None = None
    area_px: int | None = None
    area_fraction: float | None = None
    max_prob: float | None = None
    status: str = "ok"
    kaggle_id: str | None = None
    rle: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> list[str]:
        if not self.ok:
            return [self.id, printable(self.source), "", "", "", "", "", "", printable(self.status)]
        return [
            self.id,
            printable(self.source),
            str(self.height),
            str(self.width),
            str(int(bool(self.has_pneumothorax))),
            str(self.area_px),
            f"{self.area_fraction:.6f}",
            f"{self.max_prob:.6f}",
            self.status,
        ]


@dataclass(frozen=True)
class Post:
    params: PostParams
    out: Path
    overlays: bool
    kaggle: bool
    kaggle_ids: dict[str, str] = field(default_factory=dict)  # id -> ImageId (--id-map)


def _write(fn, path: Path, *args, **kwargs) -> None:
    try:
        fn(path, *args, **kwargs)
    except OSError as exc:
        raise PtxsegError(f"{path}: cannot write ({exc.strerror or exc})") from None


def native_mask(probs: np.ndarray, height: int, width: int, params: PostParams) -> np.ndarray:
    """predict's mask of one image: the model-resolution ``probs`` back at the image's
    native ``(height, width)`` (bilinear), then the one :func:`binarize` with the rule's areas
    scaled to that size. ``ptxseg serve`` calls it too, so both give the same masks.

    Shape:
        - probs: ``(S, S)`` float32; output: ``(height, width)`` uint8 in {0, 1}
    """
    native = probs_to_native(probs, height, width)
    return binarize(native, params, area_scale=area_scale(params, height, width))


def finish(item: Item, probs: np.ndarray, post: Post) -> ImageResult:
    """Native-size post-processing and the per-image files of one prediction (thread pool)."""
    h, w = item.height, item.width
    mask = native_mask(probs, h, w, post.params)
    area = int(np.count_nonzero(mask))
    _write(write_png, post.out / MASKS / f"{item.id}.png", mask * np.uint8(255))
    if post.overlays:
        overlay = draw_prediction(item.image, mask)
        _write(write_png, post.out / OVERLAYS / f"{item.id}.png", overlay, fast=True)
    result = ImageResult(
        id=item.id,
        source=item.path,
        height=h,
        width=w,
        has_pneumothorax=area > 0,
        area_px=area,
        area_fraction=area / float(h * w),
        max_prob=float(probs.max()),  # at model resolution, as evaluate's per_image.csv
    )
    if post.kaggle:
        fallback = post.kaggle_ids.get(item.id, item.id)
        result.kaggle_id = kaggle_image_id(Path(item.path), fallback)
        result.rle = encode(mask)
    return result


def error_reason(item: Item) -> str:
    message = item.error or "cannot read image"
    prefix = f"{item.path}: "
    return message.removeprefix(prefix)
