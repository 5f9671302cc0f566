"""Model size and back: the one resizing rule of training, prediction and ``prepare``.

- :func:`resize_to`: a gray image to the model's square input (area when shrinking, linear
  when growing);
- :func:`resize_mask`: its mask the same way (the same interpolation on 0/255, then a threshold
  at half), so that mask and image stay aligned to the sub-pixel (a nearest-neighbour mask
  resize next to an area image resize shifts the mask by up to half a pixel);
- :func:`probs_to_native`: a probability map back to the image's own size (bilinear).
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size): area when shrinking, linear when growing."""
    if image.shape[:2] == (size, size):
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size or image.shape[1] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a {0, 1} mask to (size, size), aligned with :func:`resize_to` of its image.

    Shape:
        - mask: ``(H, W)`` uint8 in {0, 1}
        - returns ``(size, size)`` uint8 in {0, 1}
    """
    if mask.shape[:2] == (size, size):
        return mask
    up = (mask > 0).astype(np.uint8) * 255
    return (resize_to(up, size) >= 128).astype(np.uint8)


def probs_to_native(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring a (S, S) probability map back to the image's own (height, width) (bilinear)."""
    if probs.shape == (height, width):
        return probs
    return cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
