"""Hostile image files for the decoding tests (issue 26): PostScript that writes a file or
loops forever, decompression bombs small on disk (a 13000x13000 PNG, a deflated 16000x16000
DICOM, header-only JPEG/TIFF/BMP, a DICOM whose JPEG frame or RLE segment claims more than its
header), and DICOMs of SOP classes that are not radiographs. Each is built here, in
milliseconds to a second, never stored in the repository."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def postscript(marker: Path) -> bytes:
    """The issue's EPS: asks Ghostscript to write ``marker`` (a path without parentheses)."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
        b"{ (" + str(marker).encode() + b") (w) file dup (pwned) writestring closefile } "
        b"stopped pop\nshowpage\n"
    )


POSTSCRIPT_LOOP = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\nshowpage\n"


def dos_eps(body: bytes) -> bytes:
    """``body`` behind the binary header of a DOS EPS file (magic C5 D0 D3 C6)."""
    header = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, len(body), 0, 0, 0, 0) + b"\xff\xff"
    return header + body


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_bomb(side: int = 13000) -> bytes:
    """A valid 8-bit gray PNG of ``side`` x ``side`` black pixels: about 164 KB for 13000
    (169 Mpx, under Pillow's 179 Mpx refusal), built row by row in constant memory."""
    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + the row
    parts = [comp.compress(row) for _ in range(side)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG cut after its start of scan: its SOF claims ``width`` x ``height``."""
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(1, 65))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 20) + b"\x00" + bytes([1] + [0] * 15) + b"\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + dqt + sof + dht + sos + bytes(64)


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD claims an 8-bit gray ``width`` x ``height`` strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, width * height)]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8 + 64) + bytes(64) + ifd + b"\x00\x00\x00\x00"


def bmp_header(width: int, height: int) -> bytes:
    """An 8-bit BMP whose info header claims ``width`` x ``height`` (no pixels follow)."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + palette + bytes(64)


def _dataset(rows: int, cols: int, sop_class: str, bits: int = 8):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P0"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _meta_bytes(ds, transfer_syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + buf.getvalue()


def _body_bytes(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def deflated_dicom_bomb(side: int = 16000) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of ``side`` x ``side`` 8-bit zeros: about
    250 KB for 16000 (256 MB once inflated), deflated in 4 MB pieces (constant memory)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = _dataset(side, side, SecondaryCaptureImageStorage)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [_meta_bytes(ds, DeflatedExplicitVRLittleEndian)]
    out.append(comp.compress(_body_bytes(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                                           side * side)))  # fmt: skip
    piece, left = bytes(4 << 20), side * side
    while left:
        out.append(comp.compress(piece[: min(left, len(piece))]))
        left -= min(left, len(piece))
    out.append(comp.flush())
    return b"".join(out)


def deflated_dicom(pixels: np.ndarray) -> bytes:
    """A small, valid Deflated Explicit VR Little Endian DICOM of ``pixels`` (uint8 or uint16)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = _dataset(*pixels.shape, SecondaryCaptureImageStorage, bits=pixels.dtype.itemsize * 8)
    return _save(ds, pixels.tobytes(), DeflatedExplicitVRLittleEndian)


def encapsulated_dicom(frame: bytes, transfer_syntax: str, rows: int = 1024,
                       cols: int = 1024) -> bytes:  # fmt: skip
    """A DICOM of header size ``rows`` x ``cols`` whose one encapsulated frame is ``frame``."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = _dataset(rows, cols, SecondaryCaptureImageStorage)
    return _save(ds, encapsulate([frame]), transfer_syntax)


def _save(ds, pixel_data: bytes, transfer_syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset

    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rle_bomb(rows: int = 4000, cols: int = 4000, compressed: int = 3 << 20) -> bytes:
    """An RLE Lossless DICOM of ``rows`` x ``cols`` (16 Mpx, inside the pixel limit) whose one
    segment is ``compressed`` bytes of 128-fold repeat runs: 64 times its size decoded (192 MB
    for 3 MB), far past the ``rows`` x ``cols`` bytes the header allows."""
    from pydicom.uid import RLELossless

    segment = b"\x81\x00" * (compressed // 2)  # -127: repeat the next byte 128 times
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return encapsulated_dicom(header + segment, RLELossless, rows, cols)


def dicom_of_class(sop_class: str, pixels: np.ndarray | None = None) -> bytes:
    """A small uncompressed DICOM of SOP class ``sop_class`` (with 8-bit ``pixels``, else
    without pixel data)."""
    from pydicom.uid import ExplicitVRLittleEndian

    shape = pixels.shape if pixels is not None else (8, 8)
    ds = _dataset(*shape, sop_class)
    if pixels is not None:
        return _save(ds, pixels.astype(np.uint8).tobytes(), ExplicitVRLittleEndian)
    return _meta_bytes(ds, ExplicitVRLittleEndian) + _body_bytes(ds)
