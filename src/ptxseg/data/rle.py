"""SIIM-ACR run-length encoding.

The format of the challenge (``train-rle.csv``, ``stage_2_train.csv`` and submissions): pairs
``start length`` where each ``start`` counts the pixels skipped since the END of the previous
run (relative offsets; the first one counts from pixel 0), over the image flattened
column-major (down the first column, then the second...). ``-1`` (or an empty string) means
no lesion. An image with several lesions has several rows, whose masks are OR-ed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptxseg.data.records import RleMask
from ptxseg.errors import DataError

MAX_PIXELS = 1 << 28  # refuse to allocate masks claiming more pixels than this (256 Mpx)


def is_empty(rle: str) -> bool:
    """True for the "no lesion" forms: ``-1``, empty or blank."""
    s = rle.strip()
    return s == "" or s == "-1"


def check_size(height: int, width: int, source: str | None = None) -> int:
    """Return ``height * width``; DataError when it is not positive or above ``MAX_PIXELS``."""
    total = int(height) * int(width)
    if height <= 0 or width <= 0 or total > MAX_PIXELS:
        raise DataError(
            source, f"refusing to decode a run-length mask for a {width}x{height} image"
        )
    return total


def encode(mask: np.ndarray) -> str:
    """Encode a binary mask as a SIIM run-length string.

    Args:
        mask: (H, W) array; every non-zero pixel is foreground.

    Returns:
        ``"start length start length ..."`` with relative starts, or ``"-1"`` for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"encode expects a (H, W) mask, got shape {mask.shape}")
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flat, [0]))))
    if edges.size == 0:
        return "-1"
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    gaps = starts - np.concatenate(([0], ends[:-1]))
    out = np.empty(2 * starts.size, dtype=np.int64)
    out[0::2], out[1::2] = gaps, lengths
    return " ".join(map(str, out.tolist()))


def decode(rle: str, height: int, width: int, *, source: str | None = None) -> np.ndarray:
    """Decode a SIIM run-length string into a (height, width) uint8 mask in {0, 1}.

    Args:
        rle: the ``EncodedPixels`` string; ``-1`` or blank gives an all-zero mask.
        height, width: the image size the runs refer to.
        source: file named in error messages (the CSV the row came from).

    Raises:
        DataError: malformed numbers, an odd count, negative values, a run past the end of
            the image, or an image size above ``MAX_PIXELS`` (checked before allocating).
    """
    total = check_size(height, width, source)
    flat = np.zeros(total, dtype=np.uint8)
    if is_empty(rle):
        return flat.reshape(width, height).T.copy()
    try:
        nums = np.array(rle.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise DataError(source, f"run-length row is not a list of integers: {rle[:40]!r}") from None
    if nums.size % 2:
        raise DataError(source, f"run-length row has an odd number of values ({nums.size})")
    gaps, lengths = nums[0::2], nums[1::2]
    if (gaps < 0).any() or (lengths < 0).any():
        raise DataError(source, "run-length row has negative starts or lengths")
    if (nums > total).any():  # before summing: huge values would overflow int64 and wrap
        raise DataError(
            source,
            f"run-length row runs past the image: a value of {int(nums.max())} "
            f"but a {width}x{height} image has {total} pixels",
        )
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    if ends.size and ends[-1] > total:
        raise DataError(
            source,
            f"run-length row runs past the image: ends at pixel {int(ends[-1])} "
            f"but a {width}x{height} image has {total}",
        )
    delta = np.zeros(total + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    flat[np.cumsum(delta[:-1]) > 0] = 1
    return flat.reshape(width, height).T.copy()


def decode_rows(
    rles,
    height: int,
    width: int,
    *,
    source: str | None = None,
    lines: Sequence[int] = (),
    image_id: str = "",
) -> np.ndarray:
    """OR together the masks of several run-length rows (one per lesion).

    Args:
        source: the CSV the rows came from; ``lines``: the line of each row in it (same order
            as ``rles``); ``image_id``: their ImageId. An error names all three where known:
            ``train-rle.csv: line 7 (ImageId 1.2.3): run-length row has ...``.
    """
    check_size(height, width, source)
    mask = np.zeros((height, width), dtype=np.uint8)
    for k, rle in enumerate(rles):
        if is_empty(rle):
            continue
        try:
            mask |= decode(rle, height, width, source=source)
        except DataError as exc:
            where = [f"line {lines[k]}"] if k < len(lines) else []
            if image_id:
                where.append(f"ImageId {image_id}")
            if not where:
                raise
            raise DataError(exc.path, f"{', '.join(where)}: {exc.problem}") from None
    return mask


def decode_mask(mask: RleMask, height: int, width: int) -> np.ndarray:
    """Decode an :class:`~ptxseg.data.records.RleMask` at (height, width), errors naming its
    CSV, line and ImageId."""
    return decode_rows(
        mask.rles,
        height,
        width,
        source=mask.source or None,
        lines=mask.lines,
        image_id=mask.image_id,
    )
