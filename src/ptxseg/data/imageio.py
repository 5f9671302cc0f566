"""Read radiographs and masks into plain numpy arrays.

Images become ``uint8`` (H, W) grayscale whatever they were on disk:

* PNG / JPEG / TIFF / BMP (via Pillow): 8-bit gray as is; RGB(A) / palette to luma (ITU-R 601,
  alpha ignored); 16-bit or 32-bit gray stretched linearly from the image's min..max to 0..255
  (16-bit RGB is reduced to 8 bits by Pillow, i.e. its high byte).
* DICOM (via pydicom; compressed transfer syntaxes use the installed handlers, Pillow for the
  JPEG Baseline files of SIIM-ACR): the modality LUT / rescale slope+intercept is applied, then
  the first VOI window (WindowCenter/WindowWidth, DICOM linear function) or VOI LUT where the
  header has one; otherwise 8-bit data is kept as is and deeper data is stretched min..max.
  MONOCHROME1 is inverted so that air is always dark. Multi-frame files give their first frame.

Masks become ``uint8`` (H, W) in {0, 1}: any non-zero PNG pixel is foreground; run-length
masks (:class:`~ptxseg.data.records.RleMask`) are decoded at the image size, rows OR-ed.

Only regular files are read (:func:`ptxseg.fileio.open_regular`): a FIFO, a device or a
symlink loop is a ``DataError`` at once, never a read that waits forever.

Every failure is a :class:`~ptxseg.errors.DataError` naming the file. Headers that claim more
than ``MAX_PIXELS`` pixels are refused before anything is allocated. An image that reads but
cannot be used (a DICOM without pixel data or whose pixel data no installed handler decodes,
a header over the pixel limit) is the subclass :class:`UnsupportedImage`; an upload tells the
two apart (``ptxseg serve``: 422 vs 400).

Images held in memory (an upload) are read by :func:`read_image_bytes` with the same decoders,
limits and messages, named by the name they are given.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptxseg.data.records import Record, RleMask
from ptxseg.data.rle import MAX_PIXELS, decode_mask
from ptxseg.errors import DataError
from ptxseg.fileio import open_regular

DICOM_SUFFIXES = {".dcm", ".dicom"}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) Pixel Data, little endian
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"} | DICOM_SUFFIXES


class UnsupportedImage(DataError):
    """An image whose header reads but that cannot be used: no pixel data, pixel data no
    installed handler decodes, more pixels than the limit."""


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` learns from a header: size, bits per sample, channels."""

    width: int
    height: int
    bit_depth: int
    channels: int
    format: str  # "PNG", "JPEG", "DICOM" ...


# ----------------------------------------------------------------------------- helpers


def is_dicom(path: str | Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 (files without a suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open_regular(path) as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except (OSError, DataError):
        return False


def _check_pixels(
    path: Path | str, width: int, height: int, frames: int = 1, channels: int = 1
) -> None:
    total = int(width) * int(height) * max(int(frames), 1) * max(int(channels), 1)
    if width <= 0 or height <= 0:
        raise DataError(path, f"header claims an empty image ({width}x{height})")
    if total > MAX_PIXELS:
        what = f"{width}x{height} pixels"
        if frames > 1 or channels > 1:
            what += f" x {frames} frame(s) x {channels} sample(s)"
        raise UnsupportedImage(path, f"header claims {what}, above the {MAX_PIXELS} limit; refused")


def _stretch(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of [lo, hi] (default: the array's min..max) to uint8 0..255."""
    arr = np.asarray(arr, dtype=np.float64)
    lo = float(np.nanmin(arr)) if lo is None else lo
    hi = float(np.nanmax(arr)) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) RGB(A) -> (H, W) uint8 luma (ITU-R 601-2, the weights Pillow uses)."""
    rgb = arr[..., :3].astype(np.float32)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- raster (Pillow)


def _open_pil(path: Path | str, fh):
    """Open the image in the handle ``fh`` of ``path`` (from :func:`open_regular`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except Image.DecompressionBombError as exc:
        raise UnsupportedImage(path, f"header claims too many pixels; refused ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as exc:
        raise DataError(path, f"cannot read image ({exc})") from None
    w, h = im.size
    _check_pixels(path, w, h, channels=len(im.getbands()))
    return im


def _load_pil(path: Path, *, palette_indices: bool = False) -> tuple[np.ndarray, str]:
    """Decode a raster file fully -> (array, mode). Palette images become gray through their
    palette, or stay palette indices with ``palette_indices`` (label masks)."""
    with open_regular(path) as fh:
        return _decode_pil(path, _open_pil(path, fh), palette_indices)


def _decode_pil(path: Path | str, im, palette_indices: bool) -> tuple[np.ndarray, str]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        mode = im.mode
        if mode == "1":
            arr, mode = np.asarray(im, dtype=np.uint8) * np.uint8(255), "L"
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            arr, mode = np.asarray(im.convert("RGB")), "RGB"
        elif mode in ("P", "PA") and not palette_indices:
            arr, mode = np.asarray(im.convert("RGB")), "RGB"
        elif mode == "PA":
            arr, mode = np.asarray(im)[..., 0], "P"
        else:
            arr = np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        problem = str(exc) or type(exc).__name__
        raise DataError(path, f"not a readable image ({problem})") from None
    finally:
        im.close()
    return arr, mode


def _raster_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.ndim == 3:
        if mode in ("LA", "La"):
            arr = arr[..., 0]
        else:
            return _to_gray(arr)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return _stretch(arr)  # 16/32-bit integer or float gray


# ----------------------------------------------------------------------------- DICOM

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _dcmread(path: Path, **kwargs):
    with open_regular(path) as fh:
        return _dcmread_from(path, fh, **kwargs)


def _dcmread_from(path: Path | str, fh, **kwargs):
    """A DICOM dataset from the binary handle ``fh`` (a file, or an upload's bytes), named
    ``path`` in errors."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            return pydicom.dcmread(fh, **kwargs)
        except InvalidDicomError:
            fh.seek(0)
            ds = pydicom.dcmread(fh, force=True, **kwargs)
            if "Rows" not in ds and "SOPInstanceUID" not in ds:
                raise DataError(path, "not a DICOM file") from None
            return ds
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise DataError(path, f"cannot read DICOM header ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def _dicom_errors(path: Path | str) -> Iterator[None]:
    """Corrupt header values surface lazily, when an element is first read (unknown VR,
    empty multi-valued window, non-numeric strings...): any such failure -> DataError."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt values
        raise DataError(path, f"corrupt DICOM header ({type(exc).__name__}: {exc})") from None


def _has_pixels(ds) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


def _first(value) -> float:
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) else float(value)
    except TypeError:
        return float(value)


def _window_linear(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, output 0..255."""
    arr = arr.astype(np.float64)
    if width <= 1:
        return np.where(arr > center - 0.5, 255, 0).astype(np.uint8)
    out = ((arr - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    ds = _dcmread(path)
    with _dicom_errors(path):
        return _dicom_to_uint8(path, ds)


def _dicom_to_uint8(path: Path | str, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if not _has_pixels(ds):
        raise UnsupportedImage(path, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    _check_pixels(path, cols, rows, frames, samples)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing handler, corrupt stream ...
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(tsyntax, "name", tsyntax) or "unknown transfer syntax"
        raise UnsupportedImage(path, f"cannot decode DICOM pixel data ({name}): {exc}") from None
    if arr.ndim == (3 if samples == 1 else 4):  # several frames (declared, or excess data
        arr = arr[0]  # that pydicom returns as extra frames): the first one
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return _to_gray(arr)
    rescaled = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    if rescaled:
        arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window_linear(arr, _first(ds.WindowCenter), _first(ds.WindowWidth))
    elif "VOILUTSequence" in ds:
        out = _stretch(apply_voi_lut(arr, ds, prefer_lut=True))
    elif not rescaled and int(ds.get("BitsStored", 8) or 8) <= 8 and arr.min() >= 0:
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        out = _stretch(arr)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


def dicom_meta(path: str | Path) -> dict[str, str | None]:
    """``SOPInstanceUID``, ``PatientID`` and ``ViewPosition`` from a DICOM header (no pixels).

    Missing or blank fields come back as ``None``.
    """
    ds = _dcmread(Path(path), stop_before_pixels=True)
    out = {}
    with _dicom_errors(Path(path)):
        for key in ("SOPInstanceUID", "PatientID", "ViewPosition"):
            value = str(ds.get(key, "") or "").strip()
            out[key] = value or None
    return out


# ----------------------------------------------------------------------------- public API


def probe_image(path: str | Path) -> ImageInfo:
    """Size, bits per sample and channels from the header, without decoding the pixels.

    Raises:
        DataError: unreadable header, absurd size, DICOM without pixel data.
    """
    path = Path(path)
    if is_dicom(path):
        ds = _dcmread(path, defer_size="64 KB")
        with _dicom_errors(path):
            if not _has_pixels(ds):
                raise UnsupportedImage(path, "DICOM file has no pixel data")
            w, h = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
            ch = int(ds.get("SamplesPerPixel", 1) or 1)
            _check_pixels(path, w, h, int(ds.get("NumberOfFrames", 1) or 1), ch)
            return ImageInfo(w, h, int(ds.get("BitsStored", 8) or 8), ch, "DICOM")
    with open_regular(path) as fh:
        im = _open_pil(path, fh)
        try:
            w, h = im.size
            fmt = im.format or path.suffix.lstrip(".").upper()
            bands = len(im.getbands())
            depth = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(
                im.mode, 8
            )
            if fmt == "PNG":  # the IHDR has the true depth (Pillow reduces 16-bit RGB to 8)
                fh.seek(0)
                head = fh.read(26)
                if len(head) == 26 and head[12:16] == b"IHDR":
                    depth, color = head[24], head[25]
                    bands = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, bands)
                    w, h = struct.unpack(">II", head[16:24])
            return ImageInfo(int(w), int(h), int(depth), int(bands), fmt)
        finally:
            im.close()


def read_image(path: str | Path) -> np.ndarray:
    """Read a radiograph as a ``uint8`` (H, W) grayscale array (see the module doc).

    Raises:
        DataError: missing, unreadable or truncated file; DICOM without pixel data or with a
            transfer syntax no installed handler decodes; a header claiming an absurd size.
    """
    path = Path(path)
    if is_dicom(path):
        return _read_dicom(path)
    arr, mode = _load_pil(path)
    return _raster_to_uint8(arr, mode)


def read_image_header(path: str | Path) -> tuple[np.ndarray, object | None]:
    """:func:`read_image`, and for a DICOM its header from the same read (a pydicom dataset
    without its pixel data: small enough to pass between processes), else ``None``. What needs
    the header (pixel spacing, orientation, a DICOM SEG's references) then reads no file again.

    Raises:
        DataError: as :func:`read_image`.
    """
    path = Path(path)
    if not is_dicom(path):
        return read_image(path), None
    ds = _dcmread(path)
    with _dicom_errors(path):
        image = _dicom_to_uint8(path, ds)
        for tag in _PIXEL_TAGS:
            if tag in ds:
                delattr(ds, tag)
    return image, ds


@dataclass(frozen=True)
class DecodedImage:
    """An image read from memory: the ``uint8`` (H, W) gray image, the format read
    (``"DICOM"``, ``"PNG"``, ``"JPEG"`` ...) and, for a DICOM, its pydicom dataset."""

    image: np.ndarray
    format: str
    dataset: Any = None


def read_image_bytes(data: bytes, name: str = "upload") -> DecodedImage:
    """Read an image held in memory as :func:`read_image` reads a file: the same decoders,
    pixel limit and messages, ``name`` in place of the file name.

    A DICOM is recognised by the ``DICM`` magic at byte 128 (the DICOM file preamble) or by a
    ``.dcm`` / ``.dicom`` ``name``; anything else is read by Pillow.

    Raises:
        DataError: empty, unknown, truncated or corrupt bytes (:class:`UnsupportedImage`: a
            DICOM without usable pixel data, a header over the pixel limit).
    """
    if not data:
        raise DataError(name, "empty upload (no bytes)")
    fh = io.BytesIO(data)
    if data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES:
        ds = _dcmread_from(name, fh)
        if not _has_pixels(ds) and _PIXEL_DATA_TAG in data:  # pydicom drops a cut element
            raise DataError(name, "truncated DICOM: its pixel data is cut short")
        with _dicom_errors(name):
            return DecodedImage(_dicom_to_uint8(name, ds), "DICOM", ds)
    im = _open_pil(name, fh)
    fmt = im.format or "image"
    arr, mode = _decode_pil(name, im, palette_indices=False)
    return DecodedImage(_raster_to_uint8(arr, mode), fmt)


def read_mask_raw(path: str | Path) -> np.ndarray:
    """A mask file's values as stored, (H, W) (colour masks: max over the colour channels;
    palette masks: the palette indices). Used by ``inspect`` to spot non-binary masks."""
    path = Path(path)
    if is_dicom(path):
        return _read_dicom(path)
    arr, mode = _load_pil(path, palette_indices=True)
    if arr.ndim == 3:
        arr = arr[..., :1] if mode in ("LA", "La") else arr[..., :3]
        arr = arr.max(axis=2)
    return arr


def read_mask(mask: Path | str | RleMask, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as ``uint8`` (H, W) in {0, 1}.

    Args:
        mask: a mask image (any non-zero pixel is foreground) or an :class:`RleMask`.
        shape: (H, W) of the image the mask belongs to; run-length masks are decoded at this
            size, mask images must have it.

    Raises:
        DataError: unreadable mask, a mask of another size than its image, a run-length row
            that is malformed or runs past the image (naming the CSV).
    """
    h, w = int(shape[0]), int(shape[1])
    if isinstance(mask, RleMask):
        return decode_mask(mask, h, w)  # errors name the CSV, line and ImageId
    if mask is None:
        raise ValueError("read_mask: this record has no ground truth (mask is None)")
    raw = read_mask_raw(mask)
    if raw.shape != (h, w):
        raise DataError(mask, size_mismatch(raw.shape, (h, w)))
    return (raw > 0).astype(np.uint8)


def size_mismatch(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> str:
    """The problem of a mask whose (H, W) differs from its image's, sizes written W x H."""
    (mh, mw), (ih, iw) = mask_shape[:2], image_shape[:2]
    return f"mask is {mw}x{mh} but its image is {iw}x{ih} (width x height)"


def load_pair(record: Record) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a record's image and its mask (``None`` when it has no ground truth).

    Shape: image (H, W) uint8; mask (H, W) uint8 in {0, 1}, same size (checked).
    """
    image = read_image(record.image)
    if record.mask is None:
        return image, None
    return image, read_mask(record.mask, image.shape)
