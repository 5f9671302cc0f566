"""The node's one inference function: a trained model and its rule -> the native-size mask
and the maximum probability of each image, exactly what ``ptxseg predict`` computes by default
(the same resize to the model size, :meth:`~ptxseg.predictor.Predictor.batch_probs` with the
predictor's test-time augmentation, :func:`ptxseg.image_outputs.native_mask`, the maximum
taken at model resolution as in results.csv).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptxseg.postprocess import PostParams


@dataclass(frozen=True)
class Segmented:
    """One image's prediction: its ``(H, W)`` mask in {0, 1} and the maximum probability."""

    mask: np.ndarray
    max_prob: float


def segment(predictor, params: PostParams, images: Sequence[np.ndarray]) -> list[Segmented]:
    """Segment gray radiographs of any size in one forward pass.

    Args:
        predictor: a :class:`~ptxseg.predictor.Predictor` (its TTA applies).
        params: the rule (``Run.thresholds``, at the predictor's size).
        images: ``uint8`` ``(H, W)`` images, as :mod:`ptxseg.data.imageio` reads them.

    Shape:
        - images: ``N x (H_i, W_i)`` uint8; masks: ``(H_i, W_i)`` uint8 in {0, 1}
    """
    from ptxseg.data.resize import resize_to
    from ptxseg.image_outputs import native_mask

    if not images:
        return []
    x = np.stack([resize_to(np.asarray(img, np.uint8), predictor.size) for img in images])
    probs = predictor.batch_probs(x[:, None])
    return [
        Segmented(native_mask(p, img.shape[0], img.shape[1], params), float(p.max()))
        for p, img in zip(probs, images, strict=True)
    ]
