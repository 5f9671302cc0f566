"""The datasets DataLoader workers read: training/validation pairs over
:class:`~ptxseg.data.records.Record` (:class:`SegDataset`) and the images of a prediction
(:class:`ImageDataset`).

Each training item is decoded when it is asked for (never the whole dataset in memory),
resized to the model size, then augmented (training) in the DataLoader worker. Items are uint8
tensors: the model normalises on the device, so the loader moves 1 byte per pixel.

Resizing comes before augmentation: the paper's augmentations are applied at model resolution
(4-6x cheaper than at 1024 px, and the elastic transform's ``sigma=6`` is in pixels of the
model input). Images and masks are resized by :mod:`ptxseg.data.resize`, aligned to the
sub-pixel.

A prediction item is one image file at model size plus what is needed to bring the prediction
back (its native size, optionally the image itself); a file that cannot be read becomes an
item with ``error`` set (and a blank input), never an exception that stops the run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ptxseg.data.records import Record, require_ground_truth
from ptxseg.data.resize import resize_mask, resize_to
from ptxseg.errors import DataError, PtxsegError


class ItemError(DataError):
    """A dataset item that cannot be read during training.

    Built with a single message so that a DataLoader worker can re-raise it in the main
    process; the worker's traceback text is reduced back to the one-line message.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:  # re-raised by a worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(None, message)


class SegDataset(Dataset):
    """Images and masks of ``records`` at ``size`` x ``size``, optionally augmented.

    Args:
        records: records with a ground-truth mask.
        size: output side in pixels.
        augment: ``augment(image, mask) -> (image, mask)`` with a ``reseed(seed)`` method
            (:class:`ptxseg.augment.Augmenter`; ``None``: resize only). Reseeded in each
            DataLoader worker by :func:`worker_init`.

    Shape:
        - item: ``(image, mask)``, both ``(1, size, size)`` uint8; mask in {0, 1}
    """

    def __init__(self, records: Sequence[Record], size: int, augment=None):
        require_ground_truth(records, None, "training needs a mask for every image")
        self.records = list(records)
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode and resize item ``index`` (no augmentation): uint8 (S, S) image and mask."""
        from ptxseg.data.imageio import load_pair

        try:
            image, mask = load_pair(self.records[index])  # mask: checked not None in __init__
        except PtxsegError as exc:
            raise ItemError(str(exc)) from None
        return resize_to(image, self.size), resize_mask(mask, self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return _tensor(image), _tensor(mask)

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation's generator (each worker, each epoch)."""
        if self.augment is not None:
            self.augment.reseed(seed)


def _tensor(array: np.ndarray) -> torch.Tensor:
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)[None]


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy, ``random`` and the augmentation from the
    worker's torch seed (different per worker and per epoch, reproducible from the run seed)."""
    info = get_worker_info()
    seed = int(info.seed % 2**32) if info is not None else worker_id
    np.random.seed(seed)
    random.seed(seed)
    # one worker = one core; OpenCV's own threads only oversubscribe. 0 (run sequentially),
    # not 1: setNumThreads(1) tears down the thread pool inherited through fork and
    # deadlocks when the parent had used it (tests/test_reliability_determinism.py)
    cv2.setNumThreads(0)
    dataset = info.dataset if info is not None else None
    if isinstance(dataset, SegDataset):
        dataset.reseed(seed)


@dataclass
class Item:
    """One input of a prediction; ``error`` is set when the file could not be read."""

    index: int
    id: str
    path: str
    height: int = 0
    width: int = 0
    error: str | None = None
    image: np.ndarray | None = None  # the native (H, W) uint8 image, with ``keep_image``
    header: Any = None  # a DICOM's header (pydicom dataset, no pixel data), with ``keep_header``


class ImageDataset(Dataset):
    """The images of ``entries`` (``(id, path)`` pairs) at ``size`` x ``size``.

    ``keep_image``: the native image on each item; ``keep_header``: a DICOM's header too
    (from the same read: :func:`ptxseg.data.imageio.read_image_header`).

    Shape:
        - item: ``(Item, image)``, image ``(1, size, size)`` uint8 (zeros for an unreadable
          file, whose ``Item.error`` says why)
    """

    def __init__(self, entries: Sequence[tuple[str, Path]], size: int, keep_image: bool = False,
                 keep_header: bool = False):
        self.entries = list(entries)
        self.size = size
        self.keep_image = keep_image
        self.keep_header = keep_header

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Item, torch.Tensor]:
        from ptxseg.data.imageio import read_image, read_image_header

        ident, path = self.entries[i]
        item = Item(index=i, id=ident, path=str(path))
        try:
            if self.keep_header:
                img, item.header = read_image_header(path)
            else:
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
        return item, _tensor(resize_to(img, self.size))


def collate_items(batch: Sequence[tuple[Item, torch.Tensor]]) -> tuple[list[Item], torch.Tensor]:
    """DataLoader ``collate_fn`` of :class:`ImageDataset`: the items and one uint8 batch."""
    return [b[0] for b in batch], torch.stack([b[1] for b in batch])
