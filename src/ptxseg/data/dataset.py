"""The training/validation ``Dataset`` over :class:`~ptxseg.data.records.Record`.

Each item is decoded when it is asked for (never the whole dataset in memory), resized to the
model size, then augmented (training) in the DataLoader worker. Items are uint8 tensors: the
model normalises on the device, so the loader moves 1 byte per pixel.

Resizing comes before augmentation: the paper's augmentations are applied at model resolution
(4-6x cheaper than at 1024 px, and the elastic transform's ``sigma=6`` is in pixels of the
model input). Images are resized with :func:`ptxseg.inference.resize_to` (area when
shrinking); masks with :func:`resize_mask`, the same interpolation on 0/255 then a threshold
at half, so that mask and image stay aligned to the sub-pixel.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ptxseg.data.records import Record, require_ground_truth
from ptxseg.errors import DataError, PtxsegError
from ptxseg.inference import resize_to


class ItemError(DataError):
    """A dataset item that cannot be read during training.

    Built with a single message so that a DataLoader worker can re-raise it in the main
    process; the worker's traceback text is reduced back to the one-line message.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:  # re-raised by a worker
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(None, message)


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


class SegDataset(Dataset):
    """Images and masks of ``records`` at ``size`` x ``size``, optionally augmented.

    Args:
        records: records with a ground-truth mask.
        size: output side in pixels.
        transform: an albumentations pipeline from :mod:`ptxseg.augment` (``None``: resize
            only). Reseeded in each DataLoader worker by :func:`worker_init`.

    Shape:
        - item: ``(image, mask)``, both ``(1, size, size)`` uint8; mask in {0, 1}
    """

    def __init__(self, records: Sequence[Record], size: int, transform=None):
        require_ground_truth(records, None, "training needs a mask for every image")
        self.records = list(records)
        self.size = size
        self.transform = transform

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
        if self.transform is not None:
            from ptxseg.augment import apply

            image, mask = apply(self.transform, image, mask)
        return _tensor(image), _tensor(mask)

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation's generator (each worker, each epoch)."""
        if self.transform is not None:
            from ptxseg.augment import seed_transform

            seed_transform(self.transform, seed)


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
