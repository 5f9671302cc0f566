"""Test-time augmentation: the :class:`Tta` choice and its one implementation, shared by the
torch and the ONNX Runtime backends.

``hflip`` averages the probabilities of the image and of its mirror image (mirrored back), on
whatever arrays the backend computes with: torch tensors on the device or numpy arrays. The
average is taken of probabilities, not logits, as the SIIM-ACR solutions did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ptxseg.choices import Choice

A = TypeVar("A")


class Tta(Choice):
    """Test-time augmentation (``--tta``)."""

    NONE = "none"
    HFLIP = "hflip"


def hflip(x: A) -> A:
    """``x`` mirrored along its last axis (width): a torch tensor or a numpy array."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[..., ::-1])
    return x.flip(-1)  # torch


def average(forward: Callable[[A], A], x: A, tta: str | Tta = Tta.NONE) -> A:
    """``forward(x)`` (probabilities), averaged with the mirrored prediction of the mirrored
    input for ``hflip``.

    Shape:
        - x: ``(B, 1, S, S)``; forward returns probabilities with the width as last axis
    """
    tta = Tta.parse(tta, "--tta")
    p = forward(x)
    if tta is Tta.HFLIP:
        p = 0.5 * (p + hflip(forward(hflip(x))))
    return p
