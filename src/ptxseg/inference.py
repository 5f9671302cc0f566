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
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ptxseg.errors import PtxsegError

#: devices an inference command can run on (``--device``)
DEVICES = ("auto", "cpu", "cuda")


def pick_device(accelerator: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cpu``; ``cuda`` (or ``gpu``)."""
    if accelerator not in (*DEVICES, "gpu"):
        raise PtxsegError(f"--device: unknown device '{accelerator}' (valid: {', '.join(DEVICES)})")
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


TTA_MODES = ("none", "hflip")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise PtxsegError(
            f"--tta: unknown test-time augmentation '{tta}' (valid: {', '.join(TTA_MODES)})"
        )
    return tta


@runtime_checkable
class ProbsBackend(Protocol):
    """A non-torch model (e.g. ONNX Runtime) that :func:`predict_probs` can drive.

    ``probs`` takes a uint8 batch ``(B, 1, S, S)`` (values 0..255) and returns float32
    probabilities ``(B, S, S)``; ``tta`` as in :func:`forward_probs`.
    """

    device: torch.device

    def probs(self, x: np.ndarray, tta: str = "none") -> np.ndarray: ...


def prepare_model(
    model: torch.nn.Module, device: torch.device, *, compile: bool = False
) -> torch.nn.Module:
    """Move a model to ``device`` for inference: eval mode, channels_last on CUDA (the layout
    the bf16 tensor cores want) and, when ``compile``, ``torch.compile`` (static shapes: pass
    ``pad_to_batch=True`` to :func:`predict_probs` so the last batch does not recompile)."""
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
    return model


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


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
    image: np.ndarray | None = None  # the native (H, W) uint8 image, with ``keep_image``


class _ImageDataset(Dataset):
    def __init__(self, entries: Sequence[tuple[str, Path]], size: int, keep_image: bool = False):
        self.entries = list(entries)
        self.size = size
        self.keep_image = keep_image

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
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop a run
            item.error = f"{path}: not a readable image ({type(exc).__name__}: {exc})"
        if item.error is not None:
            return item, torch.zeros((1, self.size, self.size), dtype=torch.uint8)
        item.height, item.width = img.shape[:2]
        if self.keep_image:
            item.image = img
        arr = np.ascontiguousarray(resize_to(img, self.size))
        if not arr.flags.writeable:  # decoders may hand back read-only buffers
            arr = arr.copy()
        tensor = torch.from_numpy(arr)[None]
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
    check_tta(tta)
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        p = torch.sigmoid(model(x).float())
        if tta == "hflip":
            p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[3])).float()).flip(dims=[3]))
    return p


def batch_probs(model: torch.nn.Module | ProbsBackend, x: torch.Tensor, tta: str = "none"):
    """Probabilities of a uint8 batch ``(B, 1, S, S)`` as a float32 ``(B, S, S)`` numpy array,
    from a torch model (:func:`forward_probs`) or a :class:`ProbsBackend`."""
    if isinstance(model, torch.nn.Module):
        return forward_probs(model, x, tta).squeeze(1).float().cpu().numpy()
    return model.probs(x.numpy(), tta)


def _device_of(model: torch.nn.Module | ProbsBackend) -> torch.device:
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return torch.device(model.device)


def predict_probs(
    model: torch.nn.Module,
    entries: Sequence[tuple[str, Path]],
    size: int,
    *,
    batch_size: int = 8,
    workers: int | None = None,
    tta: str = "none",
    keep_image: bool = False,
    pad_to_batch: bool = False,
) -> Iterator[tuple[Item, np.ndarray | None]]:
    """Yield ``(item, probs)`` in input order, ``probs`` a float32 (size, size) array, or
    ``None`` with ``item.error`` set for a file that could not be read.

    Args:
        model: a torch model (on its device; see :func:`prepare_model`) or a
            :class:`ProbsBackend` such as the ONNX Runtime one.
        entries: ``(id, path)`` pairs, read in DataLoader workers (``workers=0``: in this
            thread). Memory stays constant in ``len(entries)``: only the batches in flight
            are held.
        keep_image: also hand back the native image as ``item.image`` (overlays).
        pad_to_batch: pad a short last batch to ``batch_size`` (compiled, static-shape models).
    """
    check_tta(tta)
    workers = default_workers() if workers is None else workers
    device = _device_of(model)
    loader = DataLoader(
        _ImageDataset(entries, size, keep_image=keep_image),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=(2 if keep_image else 4) if workers else None,
        persistent_workers=False,
    )
    if isinstance(model, torch.nn.Module):
        model.eval()
    for items, x in loader:
        n = x.shape[0]
        if pad_to_batch and n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        probs = batch_probs(model, x, tta)[:n]
        for item, p in zip(items, probs, strict=True):
            yield item, (None if item.error else p)
