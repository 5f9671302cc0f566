"""Read radiographs and masks into plain numpy arrays: the one way from untrusted bytes (a file,
an upload) to pixels.

Images become ``uint8`` (H, W) grayscale whatever they were on disk:

* PNG / JPEG / TIFF / BMP (via Pillow): 8-bit gray as is; RGB(A) / palette to luma (ITU-R 601,
  alpha ignored); 16-bit or 32-bit gray stretched linearly from the image's min..max to 0..255
  (16-bit RGB is reduced to 8 bits by Pillow, i.e. its high byte).
* DICOM (via pydicom; compressed transfer syntaxes use the installed handlers, Pillow for the
  JPEG Baseline files of SIIM-ACR): the modality LUT / rescale slope+intercept is applied, then
  the first VOI window (WindowCenter/WindowWidth, DICOM linear function) or VOI LUT where the
  header has one; otherwise 8-bit data is kept as is and deeper data is stretched min..max.
  MONOCHROME1 is inverted so that air is always dark. Multi-frame files give their first frame
  (the only one decoded).

Masks become ``uint8`` (H, W) in {0, 1}: any non-zero PNG pixel is foreground; run-length
masks (:class:`~ptxseg.data.records.RleMask`) are decoded at the image size, rows OR-ed.

What is decoded, and how much (docs/reliability.md, "Decoding untrusted images"):

* **Formats**: only :data:`FORMATS`, recognised by their magic bytes before any decoder sees
  them (:data:`RASTER_MAGIC`; a DICOM by ``DICM`` at byte 128 or its suffix), and Pillow is
  told the one format it may open. PostScript/EPS (which Pillow hands to Ghostscript), PDF,
  GIF, WebP ... are refused by name. DICOM transfer syntaxes outside :data:`READ_SYNTAXES`
  (MPEG, HEVC, private ones ...) are refused before their pixel data is decoded.
* **Pixels**: at most :func:`max_pixels` (:data:`DEFAULT_MAX_PIXELS`, or the environment
  variable ``PTXSEG_MAX_PIXELS``) samples per image, width x height x samples x frames,
  checked from the header before decoding: PNG IHDR, JPEG SOF, TIFF and BMP headers, the DICOM
  header, then the first compressed frame's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000
  SIZ) and, for RLE, each segment's decoded length (counted, not decoded). A deflated DICOM
  data set is inflated step by step: its header first, its pixel data only once the header
  allows it, never past the length it declares. Over the limit: :class:`TooManyPixels`.
* **DICOM objects**: only radiographs (:data:`RADIOGRAPH_SOP_CLASSES`: CR, DX, Secondary
  Capture); a SEG, SR, PR, RT, CT ... is refused naming its SOP class.

Only regular files are read (:func:`ptxseg.fileio.open_regular`): a FIFO, a device or a
symlink loop is a ``DataError`` at once, never a read that waits forever.

Every failure is a :class:`~ptxseg.errors.DataError` naming the file. An image that reads but
cannot be used (a DICOM without pixel data, of another SOP class, or whose pixel data no
installed handler decodes; more pixels than the limit) is the subclass
:class:`UnsupportedImage`; an upload tells the kinds apart (``ptxseg serve``: 400, 422, and 413
for :class:`TooManyPixels`).

Images held in memory (an upload) are read by :func:`read_image_bytes` through the same
readers, limits and messages as files, named by the name they are given. The warnings of the
libraries (pydicom's above all) raised while a file is read come out after it, each once,
prefixed with the file's name (:func:`named_warnings`).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptxseg.data.records import Record, RleMask
from ptxseg.data.rle import MAX_PIXELS, decode_mask
from ptxseg.errors import ConfigError, DataError
from ptxseg.fileio import open_regular

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"} | DICOM_SUFFIXES

#: The formats read (the README's, and the TIFF / BMP this module always read).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DICOM")
#: The raster formats by the first bytes of their files (Pillow's names).
RASTER_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
# formats refused by name (the first that matches names the file)
_REFUSED_MAGIC = (
    (b"%!", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "PostScript"),  # DOS EPS binary header
    (b"%PDF", "PDF"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "Photoshop"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)
_READS = "ptxseg reads PNG, JPEG, TIFF, BMP and DICOM"

#: Twice the largest chest radiograph: the largest detector (43 cm x 43 cm) at the finest
#: pitch used for the chest (0.1 mm) is 4300 x 4300 = 18.5 Mpx; SIIM-ACR's are 1 Mpx.
DEFAULT_MAX_PIXELS = 2 * 4300 * 4300
MAX_PIXELS_ENV = "PTXSEG_MAX_PIXELS"


class UnsupportedImage(DataError):
    """An image whose header reads but that cannot be used: no pixel data, pixel data no
    installed handler decodes, a DICOM object that is not a radiograph, more pixels than the
    limit."""


class TooManyPixels(UnsupportedImage):
    """An image whose header (or compressed frame) claims more pixels than :func:`max_pixels`:
    refused before decoding."""


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


def max_pixels() -> int:
    """The most samples an image may decode to (width x height x samples x frames):
    ``PTXSEG_MAX_PIXELS`` where set (a whole number from 1 to 2^28; ``_`` may group digits),
    else :data:`DEFAULT_MAX_PIXELS`. (Pillow refuses raster images over 2 x 89.5 Mpx whatever
    this says.)

    Raises:
        ConfigError: the variable is set to anything else.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw) if raw.isascii() and raw.replace("_", "").isdigit() else 0
    except ValueError:  # misplaced underscores
        value = 0
    if not 1 <= value <= MAX_PIXELS:
        raise ConfigError(
            f"{MAX_PIXELS_ENV}: {raw!r} is not a whole number of pixels from 1 to {MAX_PIXELS}"
        )
    return value


def _check_pixels(
    path: Path | str, width: int, height: int, frames: int = 1, channels: int = 1, *,
    claims: str = "header claims",
) -> None:  # fmt: skip
    width, height = int(width), int(height)
    frames, channels = max(int(frames), 1), max(int(channels), 1)
    if width <= 0 or height <= 0:
        raise DataError(path, f"{claims} an empty image ({width}x{height})")
    limit = max_pixels()
    if width * height * frames * channels > limit:
        what = f"{width}x{height} pixels"
        if frames > 1 or channels > 1:
            what += f" x {frames} frame(s) x {channels} sample(s)"
        raise TooManyPixels(
            path, f"{claims} {what}, above the limit of {limit} pixels ({MAX_PIXELS_ENV}); refused"
        )


# ----------------------------------------------------------------------------- warnings

_warnings_lock = threading.RLock()


def _new_warnings_lock() -> None:  # a child forked while another thread held it
    global _warnings_lock
    _warnings_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_warnings_lock)


@contextlib.contextmanager
def named_warnings(name: str | Path) -> Iterator[None]:
    """The warnings raised inside (pydicom's, highdicom's, Pillow's) come out when it ends,
    each once and prefixed with ``name``: ``in/a.dcm: Invalid value for VR AS: '42'.``, so a
    warning among thousands of files says which one it is about; the caller's filters then
    apply as usual. pydicom's own `` in file ...`` ending is dropped.

    Python's warning filters are global to the process, so these blocks run one at a time (a
    lock): two threads recording at once would take each other's warnings.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with _warnings_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _reemit(str(name), caught)


def _reemit(name: str, caught: list[warnings.WarningMessage]) -> None:
    prefix, shown = f"{name}: ", set()
    for w in caught:
        text = str(w.message).removesuffix(f" in file {name}").removesuffix(" in file ")
        text = text if text.startswith(prefix) else prefix + text
        if (w.category, text) in shown:
            continue
        shown.add((w.category, text))
        warnings.warn_explicit(text, w.category, w.filename, w.lineno)


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


def _raster_format(path: Path | str, head: bytes) -> str:
    """The raster format of a file that starts with ``head`` (its first 16 bytes or more).

    Raises:
        DataError: not one of the raster :data:`FORMATS` (those known are named).
    """
    for magic, fmt in RASTER_MAGIC:
        if head.startswith(magic):
            return fmt
    known = next((name for magic, name in _REFUSED_MAGIC if head.startswith(magic)), None)
    if known is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        known = "WebP"
    if known is None:
        raise DataError(path, "not a readable image (not PNG, JPEG, TIFF, BMP or DICOM)")
    raise DataError(path, f"not a readable image ({known} is not read; {_READS})")


def _open_raster(path: Path | str, fh) -> tuple[Any, str]:
    """Pillow's image of the handle ``fh`` of ``path`` (a file from :func:`open_regular`, or
    bytes) and its format, header read and checked, pixels not decoded yet: the format is
    found from the magic bytes and is the only one Pillow may open; the size is within the
    pixel limit."""
    from PIL import Image

    fmt = _raster_format(path, fh.read(16))
    fh.seek(0)
    try:
        im = Image.open(fh, formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(path, f"header claims too many pixels; refused ({exc})") from None
    except Image.UnidentifiedImageError:
        raise DataError(path, f"not a readable image (corrupt {fmt} header)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DataError(path, f"cannot read image ({exc})") from None
    try:
        w, h = im.size
        _check_pixels(path, w, h, channels=len(im.getbands()))
    except BaseException:
        im.close()
        raise
    return im, fmt


def _read_raster(
    path: Path | str, fh, palette_indices: bool = False
) -> tuple[np.ndarray, str, str]:
    """Decode the raster image in ``fh`` -> (array, mode, format); palette images become gray
    through their palette, or stay palette indices with ``palette_indices`` (label masks)."""
    with _raster_warnings(path):
        im, fmt = _open_raster(path, fh)
        return (*_decode_pil(path, im, palette_indices), fmt)


@contextlib.contextmanager
def _raster_warnings(path: Path | str) -> Iterator[None]:
    """:func:`named_warnings`, without Pillow's decompression-bomb warning (the pixel limit
    that applies is :func:`max_pixels`, checked already)."""
    from PIL import Image

    with named_warnings(path):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode_pil(path: Path | str, im, palette_indices: bool) -> tuple[np.ndarray, str]:
    try:
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
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
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


# ----------------------------------------------------------------------------- DICOM: what is read

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAG_NUMBERS = {0x7FE00010: 0, 0x7FE00008: 32, 0x7FE00009: 64}  # -> bits per value
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

#: The DICOM objects read as radiographs, by SOP Class UID: CR, DX (for presentation and for
#: processing) and Secondary Capture, which is what the SIIM-ACR (and RSNA) challenge DICOMs
#: are. A data set that names no SOP class is read as an image.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: Native transfer syntaxes: implicit / explicit VR little endian, deflated, explicit big endian.
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                   "1.2.840.10008.1.2.2")  # fmt: skip
_DEFLATED = "1.2.840.10008.1.2.1.99"
# compressed transfer syntaxes read -> the codestream their frames hold
_FRAME_KIND = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70"), "JPEG"),  # fmt: skip
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "JPEG-LS"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"), "JPEG 2000"),
    "1.2.840.10008.1.2.5": "RLE",
}  # fmt: skip
#: The transfer syntaxes whose pixel data is read (each bounded before it is decoded): native,
#: JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000 (HTJ2K included) and RLE.
READ_SYNTAXES = NATIVE_SYNTAXES + tuple(_FRAME_KIND)

_HEADER_MAX = 16 << 20  # a deflated data set's header: what precedes its pixel data
_TRAILER_MAX = 1 << 20  # what may follow the pixel data of a deflated data set
_INFLATE_CHUNK = 1 << 20


def _uid_name(uid: str | None) -> str:
    from pydicom.uid import UID

    return UID(uid).name if uid else "no transfer syntax"


def _transfer_syntax(ds) -> str | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(uid).strip() if uid else None


def _check_sop_class(path: Path | str, ds) -> None:
    """Refuse a data set whose SOP class is not a radiograph's (a SEG, SR, PR, RT, CT...)."""
    meta = getattr(ds, "file_meta", None)
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid and meta is not None:
        uid = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if not uid or uid in RADIOGRAPH_SOP_CLASSES:
        return
    from pydicom.uid import UID

    name = UID(uid).name
    if name == uid:
        what = f"an object of SOP Class {uid}"
    else:
        what = f"{'an' if name[0] in 'AEIOU' else 'a'} {name} object (SOP Class {uid})"
    raise UnsupportedImage(
        path, f"{what}, not a radiograph: ptxseg reads CR, DX and Secondary Capture images"
    )


# ----------------------------------------------------------------------------- DICOM: reading


class _UnboundedRead(Exception):
    """pydicom asked for everything left in the stream (it inflates a deflated data set whole
    that way): at ``at``, where the data set starts."""

    def __init__(self, at: int):
        super().__init__(at)
        self.at = at


class _Source:
    """The handle pydicom reads: named for its messages (the file; empty for an upload, so that
    no name a client chose is ever looked up on disk), and refusing the one read of
    "everything that is left", which pydicom makes to inflate a deflated data set whole."""

    def __init__(self, fh, name: str):
        self._fh, self.name = fh, name

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise _UnboundedRead(self._fh.tell())
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def size(self) -> int:
        here = self._fh.tell()
        end = self._fh.seek(0, 2)
        self._fh.seek(here)
        return end


class _Inflater:
    """A deflated data set (PS3.5 A.5), inflated from ``src`` (at ``start``) as far as asked
    and no further; ``data`` holds what is inflated, ``ended`` says the stream is over."""

    def __init__(self, path: Path | str, src: _Source, start: int):
        self.path, self.src = path, src
        src.seek(start)
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.data = bytearray()
        self.ended = False

    def fill(self, size: int) -> None:
        """Inflate until ``size`` bytes are out or the stream ends."""
        try:
            while len(self.data) < size and not self.ended:
                chunk = self._z.unconsumed_tail or self.src.read(_INFLATE_CHUNK)
                if not chunk:  # the file ends (complete, or cut short)
                    self.ended = True
                    break
                self.data += self._z.decompress(chunk, size - len(self.data))
                self.ended = self._z.eof
        except zlib.error as exc:
            raise DataError(self.path, f"cannot read DICOM header (deflated data: {exc})") from None

    def more_than(self, size: int) -> bool:
        self.fill(size + 1)
        return len(self.data) > size


@dataclass
class _Header:
    """A DICOM header read up to its pixel data: the data set so far (``ds``), the pixel data
    element ``(tag, VR, declared length, where its value starts)`` or ``None`` when there is
    none, whether the file had no ``DICM`` preamble (``forced``), and for a deflated data set
    what has been inflated."""

    ds: Any
    pixel: tuple[int, str | None, int, int] | None
    forced: bool = False
    inflated: _Inflater | None = None


def _parse(path: Path | str, reader, size: int | None, *, final: bool = True):
    """``reader``: ``(read, tell)``, ``read(stop_when)`` a pydicom read that stops at the pixel
    data and ``tell()`` its position; -> (data set, pixel element). ``size``: the bytes
    available, to catch an element that claims more than them. With ``final=False`` (a part of
    an inflated data set), reading past the end means "more is needed", not a corrupt header:
    its warnings are dropped."""
    read, tell = reader
    pixel: list[tuple[int, str | None, int, int]] = []
    past_end: list[tuple[int, int]] = []

    def stop(tag, vr, length) -> bool:
        at = tell()
        if int(tag) in _PIXEL_TAG_NUMBERS:
            pixel.append((int(tag), vr, int(length), at))
            return True
        if size is not None and length != _UNDEFINED and at + length > size:
            past_end.append((int(tag), int(length)))
        return False

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read(stop)
    if not final:
        return ds, (pixel[0] if pixel else None)
    ends = [str(w.message) for w in caught if str(w.message).startswith("End of file")]
    for w in caught:  # to the caller's named_warnings
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not pixel and (past_end or ends):
        if past_end:
            tag, length = past_end[0]
            problem = (f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes, past "
                       "the end of the data")  # fmt: skip
        else:
            problem = ends[0].removesuffix(" in file ").split(" in file ")[0]
        raise DataError(path, f"cannot read DICOM header ({problem})")
    return ds, (pixel[0] if pixel else None)


def _read_header(path: Path | str, src: _Source) -> _Header:
    """The header of the DICOM in ``src`` (named ``path`` in errors), read up to its pixel
    data, whatever its transfer syntax (a deflated data set is inflated no further).

    Raises:
        DataError: not a DICOM, or a header that cannot be read.
    """
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    size = src.size()

    def partial(force: bool):
        return lambda stop: read_partial(src, stop_when=stop, force=force), src.tell

    try:
        try:
            ds, pixel = _parse(path, partial(False), size)
            return _Header(ds, pixel)
        except InvalidDicomError:
            src.seek(0)
            ds, pixel = _parse(path, partial(True), size)
            if "Rows" not in ds and "SOPInstanceUID" not in ds:
                raise DataError(path, "not a DICOM file") from None
            return _Header(ds, pixel, forced=True)
    except _UnboundedRead as unbounded:
        return _read_deflated_header(path, src, unbounded.at)
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise DataError(path, f"cannot read DICOM header ({type(exc).__name__}: {exc})") from None


def _read_deflated_header(path: Path | str, src: _Source, start: int) -> _Header:
    """The header of a deflated data set starting at ``start``: inflated in growing steps
    until its pixel data element is reached (at most :data:`_HEADER_MAX` bytes)."""
    from pydicom.filereader import read_partial

    src.seek(0)
    meta = read_partial(io.BytesIO(src.read(start)), force=True)  # preamble + file meta only
    if _transfer_syntax(meta) != _DEFLATED:
        raise DataError(path, "cannot read DICOM header (it asks for a read without bounds)")
    inflated = _Inflater(path, src, start)
    step = 64 << 10
    while True:
        inflated.fill(step)
        final = inflated.ended
        ds, pixel = _parse(path, _inflated_reader(inflated.data), len(inflated.data),
                           final=final)  # fmt: skip
        if pixel is not None or final:
            return _Header(_file_dataset(src, ds, meta), pixel, inflated=inflated)
        if step >= _HEADER_MAX:
            raise DataError(path, f"cannot read DICOM header (more than {_HEADER_MAX >> 20} MiB "
                                  "before its pixel data once inflated)")  # fmt: skip
        step *= 4


def _inflated_reader(data: bytes | bytearray):
    """``(read, tell)`` of :func:`_parse` over inflated bytes (explicit VR little endian)."""
    from pydicom.filereader import read_dataset

    buf = io.BytesIO(bytes(data))
    return lambda stop: read_dataset(buf, False, True, stop_when=stop), buf.tell


def _file_dataset(src: _Source, ds, meta):
    """A pydicom ``FileDataset`` of a data set read from inflated bytes, as pydicom makes it."""
    from pydicom.dataset import FileDataset

    out = FileDataset(src.name, ds, meta.preamble, meta.file_meta, False, True)
    out.set_original_encoding(False, True, ds._character_set)
    return out


def _check_radiograph(path: Path | str, header: _Header) -> None:
    """What the header says, checked before any pixel data is read or inflated: a radiograph's
    SOP class, a transfer syntax read here, pixel data present, the pixel limit (the header's
    size, and the values its pixel data element declares)."""
    ds = header.ds
    with _dicom_errors(path):
        _check_sop_class(path, ds)
        syntax = _transfer_syntax(ds)
        if syntax is not None and syntax not in READ_SYNTAXES:
            raise UnsupportedImage(path, f"cannot decode DICOM pixel data ({_uid_name(syntax)}): "
                                         "a transfer syntax ptxseg does not read")  # fmt: skip
        if header.pixel is None:
            raise UnsupportedImage(path, "DICOM file has no pixel data")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        _check_pixels(path, cols, rows, frames, samples)
        tag, _, length, _ = header.pixel
        if length != _UNDEFINED:
            bits = _PIXEL_TAG_NUMBERS[tag] or int(ds.get("BitsAllocated", 8) or 8)
            values = length * 8 // max(bits, 1)
            limit = max_pixels()
            if values > limit:
                raise TooManyPixels(
                    path, f"pixel data holds {values} values, above the limit of {limit} "
                    f"pixels ({MAX_PIXELS_ENV}); refused"
                )


def _read_data_set(path: Path | str, src: _Source, header: _Header):
    """The whole data set of a checked header: read again with its pixel data (a deflated one
    inflated to the end of its pixel data and at most :data:`_TRAILER_MAX` bytes more).

    Raises:
        DataError: the pixel data is cut short ("truncated DICOM"), or inflates past its end.
    """
    from pydicom.filereader import read_partial

    _, _, length, start = header.pixel
    truncated = DataError(path, "truncated DICOM: its pixel data is cut short")
    try:
        if header.inflated is not None:
            inflated = header.inflated
            if length != _UNDEFINED:
                need = start + length + _TRAILER_MAX
                if inflated.more_than(need):
                    raise TooManyPixels(path, f"deflated data set inflates to more than {need} "
                                              "bytes, past its pixel data; refused")  # fmt: skip
                if start + length > len(inflated.data):
                    raise truncated
            ds = _inflated_reader(inflated.data)[0](None)
            ds = _file_dataset(src, ds, header.ds)
        else:
            if length != _UNDEFINED and start + length > src.size():
                raise truncated
            src.seek(0)
            ds = read_partial(src, force=header.forced)
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt data
        raise DataError(path, f"cannot read DICOM data ({type(exc).__name__}: {exc})") from None
    if not _has_pixels(ds):  # pydicom drops an encapsulated element cut before its delimiter
        raise truncated
    ds.buffer = None  # the handle is closed after this read (and a data set must pickle)
    return ds


def _read_dicom_header_from(path: Path | str, fh, *, upload: bool = False):
    """The header of the DICOM in ``fh`` (no pixel data, nothing checked), warnings named."""
    src = _Source(fh, "" if upload else str(path))
    with named_warnings(path):
        ds = _read_header(path, src).ds
    ds.buffer = None
    return ds


def _decode_dicom(path: Path | str, fh, *, upload: bool = False) -> tuple[np.ndarray, Any]:
    """The one DICOM reader, for files and uploads alike: the header read and checked
    (:func:`_check_radiograph`), then the data set, then its first frame decoded (its codestream
    checked first, :func:`_check_frame`) -> (uint8 image, data set with its pixel data).
    Library warnings come out named (:func:`named_warnings`).

    Raises:
        DataError: see :func:`read_image`.
    """
    src = _Source(fh, "" if upload else str(path))
    with named_warnings(path):
        header = _read_header(path, src)
        _check_radiograph(path, header)
        ds = _read_data_set(path, src, header)
        with _dicom_errors(path):
            return _dicom_to_uint8(path, ds), ds


def _dcmread(path: Path, *, stop_before_pixels: bool = True):
    """A DICOM file's header (no pixel data; bounded like every read here), for the modules
    that need one (lesion measures, DICOM SEG sources)."""
    if not stop_before_pixels:
        raise ValueError("_dcmread reads headers only: use read_image_header")
    with open_regular(path) as fh:
        return _read_dicom_header_from(path, fh)


def read_dicom_object(path: str | Path):
    """A whole DICOM object that ptxseg wrote itself (a spooled SEG, SR or Secondary Capture
    waiting to be sent), read through :func:`ptxseg.fileio.open_regular`; not for images to
    decode (those go through :func:`read_image` and its checks).

    Raises:
        DataError: not a regular file, or not a DICOM pydicom can read.
    """
    from pydicom import dcmread

    with open_regular(path) as fh, _dicom_errors(path):
        return dcmread(fh)


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


# ----------------------------------------------------------------------------- DICOM: frames


def _first_frame(path: Path | str, ds, syntax: str) -> bytes:
    from pydicom.encaps import get_frame

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return get_frame(ds.PixelData, 0, number_of_frames=frames, extended_offsets=offsets)
    except Exception as exc:  # noqa: BLE001 - a corrupt item structure
        raise UnsupportedImage(path, f"cannot decode DICOM pixel data ({_uid_name(syntax)}): "
                                     f"{exc}") from None  # fmt: skip


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                          0xCF, 0xF7})  # fmt: skip # F7: JPEG-LS SOF55


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG or JPEG-LS codestream's frame header (ITU T.81
    B.2.2, T.87 C.2.2), or ``None`` when ``data`` is not such a stream."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height, data[i + 9]
        if marker in (0xDA, 0xD9):  # a scan, or the end, before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _j2k_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG 2000 codestream's SIZ segment (ISO 15444-1
    A.5.1), bare or in a JP2 file, or ``None`` when ``data`` is not one."""
    if data[:4] == b"\xffO\xffQ":
        at = 0
    elif data[4:8] == b"jP  ":
        at = data.find(b"\xffO\xffQ", 0, 1 << 16)
    else:
        return None
    siz = data[at + 4 : at + 42]
    if at < 0 or len(siz) < 38:
        return None
    x, y, x0, y0 = struct.unpack(">IIII", siz[4:20])
    return x - x0, y - y0, int.from_bytes(siz[36:38], "big")


def _rle_decoded_length(segment: bytes, stop_after: int) -> int:
    """The bytes an RLE segment decodes to (PS3.5 G.3.1), counted from its run headers without
    decoding; counting stops once past ``stop_after``."""
    n = pos = 0
    size = len(segment)
    while pos < size and n <= stop_after:
        h = segment[pos]
        if h < 128:  # a literal run of h + 1 bytes
            n += h + 1
            pos += h + 2
        elif h > 128:  # one byte repeated 257 - h times
            n += 257 - h
            pos += 2
        else:
            pos += 1
    return n


def _check_rle(path: Path | str, frame: bytes, rows: int, cols: int) -> None:
    """Each segment of an RLE frame decodes to rows x cols bytes (one more for padding):
    refused when one would decode to more (PackBits repeats a byte up to 128 times, so a
    segment can claim 64 times its size)."""
    header = struct.unpack("<16I", frame[:64]) if len(frame) >= 64 else (0,)
    segments = header[0]
    if not 1 <= segments <= 15:
        raise UnsupportedImage(path, "cannot decode DICOM pixel data (RLE Lossless): its frame "
                                     f"header declares {segments} segments")  # fmt: skip
    ends = [*header[1 : segments + 1], len(frame)]
    for i in range(segments):
        if _rle_decoded_length(frame[ends[i] : ends[i + 1]], rows * cols + 1) > rows * cols + 1:
            raise TooManyPixels(path, f"RLE segment {i + 1} decodes to more than the {cols}x{rows} "
                                      "bytes of its frame; refused")  # fmt: skip


def _check_frame(path: Path | str, ds, syntax: str) -> None:
    """The first frame of compressed pixel data, checked before it is decoded: its own
    codestream header within the pixel limit (it, not the DICOM header, sizes the decoder's
    output), RLE segments no longer than their frame."""
    kind = _FRAME_KIND.get(syntax)
    if kind is None:
        return
    frame = _first_frame(path, ds, syntax)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if kind == "RLE":
        _check_rle(path, frame, rows, cols)
        return
    size = _j2k_frame_size(frame) if kind == "JPEG 2000" else _jpeg_frame_size(frame)
    if size is None:
        raise UnsupportedImage(path, f"cannot decode DICOM pixel data ({_uid_name(syntax)}): its "
                                     f"first frame is not a {kind} codestream")  # fmt: skip
    width, height, components = size
    if width <= 0 or height <= 0:
        raise UnsupportedImage(
            path, f"cannot decode DICOM pixel data ({_uid_name(syntax)}): its first frame "
            f"claims an empty image ({width}x{height})"
        )
    _check_pixels(path, width, height, 1, components, claims="its first frame claims")


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


def _dicom_to_uint8(path: Path | str, ds) -> np.ndarray:
    """The first frame of a checked data set (:func:`_check_radiograph`) as uint8 gray."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    syntax = _transfer_syntax(ds)
    _check_frame(path, ds, syntax)
    try:
        arr = pixel_array(ds, index=0)  # the first frame only, whatever the frame count
    except Exception as exc:  # missing handler, corrupt stream ...
        raise UnsupportedImage(path, f"cannot decode DICOM pixel data ({_uid_name(syntax)}): "
                                     f"{exc}") from None  # fmt: skip
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
    ds = _dcmread(Path(path))
    out = {}
    with _dicom_errors(Path(path)):
        for key in ("SOPInstanceUID", "PatientID", "ViewPosition"):
            value = str(ds.get(key, "") or "").strip()
            out[key] = value or None
    return out


# ----------------------------------------------------------------------------- public API


def probe_image(path: str | Path) -> ImageInfo:
    """Size, bits per sample and channels from the header, without decoding the pixels; the
    header checks of :func:`read_image` (format, pixel limit, a DICOM's SOP class, transfer
    syntax and pixel data) apply.

    Raises:
        DataError: as :func:`read_image`, for what a header shows.
    """
    path = Path(path)
    with open_regular(path) as fh:
        if is_dicom(path):
            with named_warnings(path):
                header = _read_header(path, _Source(fh, str(path)))
                _check_radiograph(path, header)
            ds = header.ds
            with _dicom_errors(path):
                w, h = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
                ch = int(ds.get("SamplesPerPixel", 1) or 1)
                return ImageInfo(w, h, int(ds.get("BitsStored", 8) or 8), ch, "DICOM")
        with _raster_warnings(path):
            im, fmt = _open_raster(path, fh)
        try:
            w, h = im.size
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
        DataError: missing, unreadable or truncated file; a format not read (PostScript,
            GIF ...). :class:`UnsupportedImage`: a DICOM without pixel data, of a SOP class
            that is not a radiograph's, or with a transfer syntax no installed handler
            decodes; :class:`TooManyPixels`: a header (or compressed frame) over the limit.
    """
    return read_image_header(path)[0]


def read_image_header(path: str | Path) -> tuple[np.ndarray, object | None]:
    """:func:`read_image`, and for a DICOM its header from the same read (a pydicom dataset
    without its pixel data: small enough to pass between processes), else ``None``. What needs
    the header (pixel spacing, orientation, a DICOM SEG's references) then reads no file again.

    Raises:
        DataError: as :func:`read_image`.
    """
    path = Path(path)
    with open_regular(path) as fh:
        if not is_dicom(path):
            arr, mode, _ = _read_raster(path, fh)
            return _raster_to_uint8(arr, mode), None
        image, ds = _decode_dicom(path, fh)
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
    """Read an image held in memory as :func:`read_image` reads a file: the same readers,
    checks, pixel limit and messages, ``name`` in place of the file name.

    A DICOM is recognised by the ``DICM`` magic at byte 128 (the DICOM file preamble) or by a
    ``.dcm`` / ``.dicom`` ``name``; anything else must be one of the raster :data:`FORMATS`
    by its magic bytes.

    Raises:
        DataError: empty, unknown, truncated or corrupt bytes; :class:`UnsupportedImage` and
            :class:`TooManyPixels` as for :func:`read_image`.
    """
    if not data:
        raise DataError(name, "empty upload (no bytes)")
    fh = io.BytesIO(data)
    if data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES:
        image, ds = _decode_dicom(name, fh, upload=True)
        return DecodedImage(image, "DICOM", ds)
    arr, mode, fmt = _read_raster(name, fh)
    return DecodedImage(_raster_to_uint8(arr, mode), fmt)


def read_mask_raw(path: str | Path) -> np.ndarray:
    """A mask file's values as stored, (H, W) (colour masks: max over the colour channels;
    palette masks: the palette indices). Used by ``inspect`` to spot non-binary masks."""
    path = Path(path)
    if is_dicom(path):
        return read_image(path)
    with open_regular(path) as fh:
        arr, mode, _ = _read_raster(path, fh, palette_indices=True)
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
