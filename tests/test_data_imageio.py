"""Image and mask reading: bit depths, colour, DICOM (real JPEG-compressed + built ones),
windowing, MONOCHROME1, absurd headers, truncated files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ptxseg.data.imageio import dicom_meta, load_pair, probe_image, read_image, read_mask
from ptxseg.data.records import Record, RleMask
from ptxseg.data.rle import encode
from ptxseg.errors import DataError


def _ramp(h=6, w=9, dtype=np.uint8, lo=0, hi=255):
    return np.linspace(lo, hi, h * w).reshape(h, w).astype(dtype)


def test_png_8bit_gray_is_returned_unchanged(tmp_path):
    arr = _ramp()
    cv2.imwrite(str(tmp_path / "a.png"), arr)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    info = probe_image(tmp_path / "a.png")
    assert (info.width, info.height, info.bit_depth, info.channels) == (9, 6, 8, 1)


def test_png_16bit_gray_is_stretched_min_max(tmp_path):
    arr = _ramp(dtype=np.uint16, lo=1000, hi=3000)
    cv2.imwrite(str(tmp_path / "a.png"), arr)
    expected = np.rint((arr.astype(float) - 1000) / 2000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), expected)
    assert probe_image(tmp_path / "a.png").bit_depth == 16


def test_rgb_and_rgba_become_luma(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((7, 5), 10, np.uint8)])  # alpha must be ignored
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    for name in ("rgb.png", "rgba.png"):
        out = read_image(tmp_path / name)
        assert out.shape == (7, 5)
        assert np.abs(out.astype(int) - expected).max() <= 1
    info = probe_image(tmp_path / "rgba.png")
    assert info.channels == 4 and info.bit_depth == 8


def test_16bit_rgb_png_probe_and_read(tmp_path):
    arr = (np.arange(4 * 3 * 3).reshape(4, 3, 3) * 1000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), arr)
    info = probe_image(tmp_path / "a.png")
    assert (info.bit_depth, info.channels) == (16, 3)
    assert read_image(tmp_path / "a.png").shape == (4, 3)


def test_jpeg_gray_matches_opencv(tmp_path):
    arr = cv2.GaussianBlur(_ramp(64, 64), (5, 5), 2)
    cv2.imwrite(str(tmp_path / "a.jpg"), arr)
    ref = cv2.imread(str(tmp_path / "a.jpg"), cv2.IMREAD_GRAYSCALE).astype(int)
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - ref).max() <= 2


def test_real_sample_dicoms_decode(sample_dir):
    import pydicom

    files = sorted((sample_dir / "dicom").glob("*.dcm"))
    assert len(files) == 12
    for f in files:
        img = read_image(f)
        assert img.shape == (1024, 1024) and img.dtype == np.uint8
        ref = pydicom.dcmread(f).pixel_array  # 8-bit MONOCHROME2, no window: kept as is
        np.testing.assert_array_equal(img, ref)
        assert img.std() > 20  # a real radiograph, not a blank
        meta = dicom_meta(f)
        assert meta["SOPInstanceUID"] == f.stem
        assert meta["PatientID"]
        info = probe_image(f)
        assert (info.width, info.height, info.bit_depth, info.format) == (1024, 1024, 8, "DICOM")


def test_dicom_16bit_window_and_monochrome1(tmp_path, make_dicom):
    pix = _ramp(8, 8, np.uint16, 0, 4000)
    make_dicom(tmp_path / "w.dcm", pix, BitsStored=12, HighBit=11,
               WindowCenter=2000, WindowWidth=1001)
    c, w = 2000, 1001  # DICOM linear VOI function, independent computation
    expected = np.clip(np.rint(((pix - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255)
    np.testing.assert_array_equal(read_image(tmp_path / "w.dcm"), expected.astype(np.uint8))

    make_dicom(tmp_path / "m1.dcm", pix, BitsStored=12, HighBit=11,
               PhotometricInterpretation="MONOCHROME1")
    stretched = np.rint(pix.astype(float) / 4000 * 255)
    expected = (255 - stretched).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "m1.dcm"), expected)


def test_dicom_rescale_applied_before_window(tmp_path, make_dicom):
    pix = _ramp(4, 4, np.uint16, 0, 2000)
    make_dicom(tmp_path / "r.dcm", pix, RescaleSlope=2, RescaleIntercept=-1000,
               WindowCenter=1000, WindowWidth=2001)
    hu = pix.astype(float) * 2 - 1000
    expected = np.clip(np.rint(((hu - 999.5) / 2000 + 0.5) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "r.dcm"), expected)


def test_dicom_without_pixel_data(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(DataError, match="no pixel data") as err:
        read_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="no pixel data"):
        probe_image(path)


def test_dicom_claiming_absurd_size_is_refused(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "huge.dcm", np.zeros((2, 2), np.uint8), Rows=60000, Columns=60000)
    with pytest.raises(DataError, match="refused"):
        read_image(path)


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_png_claiming_absurd_size_is_refused(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DataError, match="too many pixels|refused") as err:
        read_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(err.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / f"full{suffix}"), arr)
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable image") as err:
        read_image(tmp_path / f"cut{suffix}")
    assert str(err.value).startswith(str(tmp_path / f"cut{suffix}"))
    assert "\n" not in str(err.value)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "text.dcm").write_text("hello")
    with pytest.raises(DataError, match="text.dcm"):
        read_image(tmp_path / "text.dcm")


def test_read_mask_png_and_rle(tmp_path):
    mask = np.zeros((6, 5), np.uint8)
    mask[1:4, 2:4] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    out = read_mask(tmp_path / "m.png", (6, 5))
    np.testing.assert_array_equal(out, (mask > 0).astype(np.uint8))
    rle = RleMask((encode(mask > 0), "-1"), "x.csv")
    np.testing.assert_array_equal(read_mask(rle, (6, 5)), out)
    assert read_mask(RleMask((), "x.csv"), (6, 5)).sum() == 0


def test_rle_past_the_image_names_the_csv():
    with pytest.raises(DataError, match="runs past the image") as err:
        read_mask(RleMask(("10 50",), "data/train-rle.csv"), (6, 5))
    assert str(err.value).startswith("data/train-rle.csv: ")


def test_mask_of_another_size(tmp_path):
    cv2.imwrite(str(tmp_path / "img.png"), _ramp(6, 5))
    cv2.imwrite(str(tmp_path / "m.png"), np.zeros((6, 6), np.uint8))
    rec = Record("a", tmp_path / "img.png", tmp_path / "m.png")
    with pytest.raises(DataError, match="mask is 6x6 but its image is 5x6") as err:
        load_pair(rec)
    assert str(err.value).startswith(str(tmp_path / "m.png"))


def test_load_pair(tmp_path):
    cv2.imwrite(str(tmp_path / "img.png"), _ramp(6, 5))
    mask = np.zeros((6, 5), np.uint8)
    mask[2, 2] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    img, m = load_pair(Record("a", tmp_path / "img.png", tmp_path / "m.png", True))
    assert img.shape == m.shape == (6, 5) and m.sum() == 1 and m[2, 2] == 1
    img2, none = load_pair(Record("a", tmp_path / "img.png", None))
    assert none is None and img2.shape == (6, 5)


def test_palette_image_uses_palette_mask_uses_indices(tmp_path):
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 200, 200, 200, 50, 50, 50] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[0, 200], [50, 200]])
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", (2, 2)), [[0, 1], [1, 1]])
