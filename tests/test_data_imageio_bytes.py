"""Images read from memory (an upload) are the images read from files: the same decoders,
pixel limit and messages (``ptxseg.data.imageio.read_image_bytes``)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ptxseg.data.imageio import UnsupportedImage, read_image, read_image_bytes
from ptxseg.data.rle import MAX_PIXELS
from ptxseg.errors import DataError


def test_every_real_sample_image_reads_the_same_from_bytes(sample_dir):
    paths = sorted((sample_dir / "png_images").glob("*.png"))[:6]
    paths += sorted((sample_dir / "dicom").glob("*.dcm"))
    for path in paths:
        decoded = read_image_bytes(path.read_bytes(), path.name)
        np.testing.assert_array_equal(decoded.image, read_image(path))
        assert decoded.format == ("DICOM" if path.suffix == ".dcm" else "PNG")
        assert (decoded.dataset is not None) == (path.suffix == ".dcm")
        if decoded.dataset is not None:
            assert decoded.dataset.SOPInstanceUID == path.stem


def test_jpeg_and_16_bit_png_from_bytes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    deep = (rng.integers(0, 4000, (40, 60))).astype(np.uint16)
    for name, im in (("a.jpg", Image.fromarray(gray)), ("b.png", Image.fromarray(deep))):
        path = tmp_path / name
        im.save(path)
        decoded = read_image_bytes(path.read_bytes(), "x")
        np.testing.assert_array_equal(decoded.image, read_image(path))
        assert decoded.format == ("JPEG" if name.endswith("jpg") else "PNG")


def test_a_dicom_without_preamble_reads_by_its_name(tmp_path, make_dicom):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    data = make_dicom(tmp_path / "a.dcm", pixels).read_bytes()
    # past the 128-byte preamble and "DICM": a bare dataset, told apart only by its name
    bare = data[132:]
    with pytest.raises(DataError, match="not a readable image"):
        read_image_bytes(bare, "upload")
    np.testing.assert_array_equal(read_image_bytes(bare, "upload.dcm").image, pixels)


def test_errors_name_the_upload_and_unsupported_is_its_own_kind(tmp_path, make_dicom):
    with pytest.raises(DataError) as exc:
        read_image_bytes(b"", "x.png")
    assert str(exc.value) == "x.png: empty upload (no bytes)"
    with pytest.raises(DataError) as exc:
        read_image_bytes(b"not an image", "upload")
    assert str(exc.value) == "upload: not a readable image (not PNG, JPEG, TIFF, BMP or DICOM)"
    assert not isinstance(exc.value, UnsupportedImage)
    nopix = make_dicom(tmp_path / "n.dcm", None, Rows=4, Columns=4).read_bytes()
    with pytest.raises(UnsupportedImage, match="^upload: DICOM file has no pixel data$"):
        read_image_bytes(nopix, "upload")
    with pytest.raises(UnsupportedImage, match="no pixel data"):  # the same kind from a file
        read_image(tmp_path / "n.dcm")
    # a header claiming too many pixels: refused before anything is allocated
    side = int(MAX_PIXELS**0.5) + 1
    huge = make_dicom(tmp_path / "h.dcm", np.zeros((2, 2), np.uint8)).read_bytes()
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(huge))
    ds.Rows = ds.Columns = side
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(UnsupportedImage, match=f"header claims {side}x{side} pixels"):
        read_image_bytes(buf.getvalue(), "upload")


def test_a_dicom_cut_inside_its_pixel_data_is_truncated_not_unsupported(sample_dir):
    data = sorted((sample_dir / "dicom").glob("*.dcm"))[0].read_bytes()
    with pytest.raises(DataError) as exc:
        read_image_bytes(data[: len(data) // 2], "upload")
    assert str(exc.value) == "upload: truncated DICOM: its pixel data is cut short"
    assert not isinstance(exc.value, UnsupportedImage)
