"""Batched probability prediction shared by tune, evaluate and predict.

Reading/decoding runs in DataLoader workers, overlapped with the model; the model runs in
batches on the GPU when present (bf16 autocast, channels_last), on the CPU otherwise.
Probabilities come back at model resolution; callers resize them to native size if needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ptxseg.errors import PtxsegError


def pick_device(accelerator: str = "auto") -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PtxsegError("accelerator 'gpu' requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 on older GPUs, none (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1)))


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size): area when shrinking, linear when growing."""
    if image.shape[:2] == (size, size):
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size or image.shape[1] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def probs_to_native(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring a (S, S) probability map back to the image's own (height, width) (bilinear)."""
    if probs.shape == (height, width):
        return probs
    return cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass
class Item:
    """One input of a prediction run; ``error`` is set when the file could not be read."""

    index: int
    id: str
    path: str
    height: int = 0
    width: int = 0
    error: str | None = None


class _ImageDataset(Dataset):
    def __init__(self, entries: Sequence[tuple[str, Path]], size: int):
        self.entries = list(entries)
        self.size = size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from ptxseg.data.imageio import read_image

        ident, path = self.entries[i]
        item = Item(index=i, id=ident, path=str(path))
        try:
            img = read_image(path)
        except PtxsegError as exc:
            item.error = str(exc)
            return item, torch.zeros((1, self.size, self.size), dtype=torch.uint8)
        item.height, item.width = img.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(resize_to(img, self.size)))[None]
        return item, tensor


def _collate(batch):
    items = [b[0] for b in batch]
    return items, torch.stack([b[1] for b in batch])


@torch.inference_mode()
def forward_probs(model: torch.nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Sigmoid probabilities of a batch (B, 1, S, S); ``tta='hflip'`` averages the image and
    its mirror."""
    device = next(model.parameters()).device
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        p = torch.sigmoid(model(x).float())
        if tta == "hflip":
            p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[3])).float()).flip(dims=[3]))
        elif tta != "none":
            raise PtxsegError(f"--tta: unknown test-time augmentation '{tta}' (valid: none, hflip)")
    return p


def predict_probs(
    model: torch.nn.Module,
    entries: Sequence[tuple[str, Path]],
    size: int,
    *,
    batch_size: int = 8,
    workers: int | None = None,
    tta: str = "none",
) -> Iterator[tuple[Item, np.ndarray | None]]:
    """Yield ``(item, probs)`` in input order, ``probs`` a float32 (size, size) array, or
    ``None`` with ``item.error`` set for a file that could not be read."""
    workers = default_workers() if workers is None else workers
    device = next(model.parameters()).device
    loader = DataLoader(
        _ImageDataset(entries, size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    model.eval()
    for items, x in loader:
        probs = forward_probs(model, x, tta).squeeze(1).cpu().numpy()
        for item, p in zip(items, probs, strict=True):
            yield item, (None if item.error else p)
