"""Training augmentation: the paper's albumentations pipeline. The only module that imports
albumentations (with its online update check off).

The train pipeline (the paper's code, albumentations 2.x names):

- ``HorizontalFlip`` p=``augment.hflip_p`` (0.5)
- ``OneOf(RandomBrightnessContrast, RandomGamma)`` p=``augment.color_p`` (0.3)
- ``OneOf(ElasticTransform(alpha=120, sigma=6), GridDistortion,
  OpticalDistortion(distort_limit=2))`` p=``augment.distort_p`` (0.3)
- ``Affine(translate 0.2, scale 0.8-1.2, rotate +-20, constant border)`` p=``augment.affine_p``
  (0.5)

The paper's final ``Resize(512, 512)`` is done by :class:`ptxseg.data.dataset.SegDataset`
*before* these transforms (validation: resize only), with an image/mask pair of resizers
that stay aligned to the sub-pixel (a nearest-neighbour mask resize next to an area image
resize shifts the mask by up to half a pixel). Augmenting at model size is also 4-6x cheaper
than at 1024 px, and the elastic ``sigma=6`` is in pixels of the model input. Masks are warped
with nearest-neighbour interpolation and a zero border, so they stay binary ({0, 1}) and
aligned with the image.

Randomness: all transforms of one pipeline draw from ONE shared generator pair
(:func:`seed_transform`). albumentations' own ``Compose(seed=...)`` seeds every child
transform with the same seed, which makes their first draws identical (e.g. flip and affine
always applied together); sharing one generator avoids that and keeps runs reproducible.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

# albumentations asks PyPI for a newer version when imported (albumentations/__init__.py,
# check_version.check_for_updates: a 2 s request, "Error fetching version info" offline);
# NO_ALBUMENTATIONS_UPDATE=1 is its switch. ptxseg reaches for no network it was not asked to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2
import numpy as np

from ptxseg.config import AugmentConfig

# The paper's constants (not config keys: they define the recipe, the probabilities do not).
ELASTIC_ALPHA = 120.0
ELASTIC_SIGMA = 6.0  # 120 * 0.05, as in the paper's code
OPTICAL_DISTORT_LIMIT = 2.0
AFFINE_TRANSLATE = 0.2
AFFINE_SCALE = (0.8, 1.2)
AFFINE_ROTATE = (-20.0, 20.0)


def build_train_transform(cfg: AugmentConfig, seed: int | None = None) -> A.Compose | None:
    """The paper's training augmentation, applied to images already at model size.

    Args:
        cfg: the ``augment`` section (probabilities; ``enabled: false`` -> ``None``).
        seed: seed of the shared random generator (``None``: fresh entropy).

    Returns:
        the pipeline, or ``None`` when augmentation is disabled (resize only).
    """
    if not cfg.enabled:
        return None
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    transforms = [
        A.HorizontalFlip(p=cfg.hflip_p),
        A.OneOf([A.RandomBrightnessContrast(p=1.0), A.RandomGamma(p=1.0)], p=cfg.color_p),
        A.OneOf(
            [
                A.ElasticTransform(alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA, p=1.0, **border),
                A.GridDistortion(p=1.0, **border),
                A.OpticalDistortion(distort_limit=OPTICAL_DISTORT_LIMIT, p=1.0, **border),
            ],
            p=cfg.distort_p,
        ),
        A.Affine(
            translate_percent=(-AFFINE_TRANSLATE, AFFINE_TRANSLATE),
            scale=AFFINE_SCALE,
            rotate=AFFINE_ROTATE,
            p=cfg.affine_p,
            **border,
        ),
    ]
    return seed_transform(A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST), seed)


def seed_transform(transform: A.Compose, seed: int | None) -> A.Compose:
    """Make every transform of ``transform`` draw from one shared generator seeded by ``seed``
    (in place; returns ``transform``). Call again in each DataLoader worker with a
    worker-specific seed."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def apply(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (image, mask) pair (same size in and out).

    Shape:
        - image: ``(H, W)`` uint8; mask: ``(H, W)`` uint8 in {0, 1}
        - returns ``(H, W)`` uint8 image and ``(H, W)`` uint8 mask in {0, 1}
    """
    out: dict[str, Any] = transform(image=image, mask=mask)
    return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"])


@dataclass
class Augmenter:
    """A pipeline as the training dataset uses it: ``augmenter(image, mask)`` augments a pair
    (:func:`apply`) and ``augmenter.reseed(seed)`` reseeds it (:func:`seed_transform`), so the
    data layer never imports albumentations."""

    transform: A.Compose

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return apply(self.transform, image, mask)

    def reseed(self, seed: int | None) -> None:
        seed_transform(self.transform, seed)


def train_augmenter(cfg: AugmentConfig, seed: int | None = None) -> Augmenter | None:
    """:func:`build_train_transform` as an :class:`Augmenter` (``None`` when disabled)."""
    transform = build_train_transform(cfg, seed)
    return None if transform is None else Augmenter(transform)
