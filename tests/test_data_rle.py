"""SIIM run-length: hand-worked examples, the real sample rows vs the PNG masks, round trip."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ptxseg.data.rle import decode, decode_rows, encode
from ptxseg.errors import DataError


def test_hand_worked_example_is_column_major_with_relative_starts():
    # 3x4 image, foreground at column 0 rows 1-2 and column 2 rows 0..2 + column 3 row 0
    mask = np.array(
        [[0, 0, 1, 1],
         [1, 0, 1, 0],
         [1, 0, 1, 0]], dtype=np.uint8
    )
    # column-major flat: col0=[0,1,1] col1=[0,0,0] col2=[1,1,1] col3=[1,0,0]
    # runs: start 1 len 2 (ends 3); start 6 len 4 -> gap 3
    assert encode(mask) == "1 2 3 4"
    np.testing.assert_array_equal(decode("1 2 3 4", 3, 4), mask)


def test_empty_forms_decode_to_zeros():
    for rle in ("-1", " -1", "", "   "):
        out = decode(rle, 5, 7)
        assert out.shape == (5, 7) and out.dtype == np.uint8 and out.sum() == 0
    assert encode(np.zeros((4, 4), np.uint8)) == "-1"


def test_full_mask_and_last_pixel_run():
    full = np.ones((3, 3), np.uint8)
    assert encode(full) == "0 9"
    last = np.zeros((3, 3), np.uint8)
    last[2, 2] = 1
    assert encode(last) == "8 1"
    np.testing.assert_array_equal(decode("8 1", 3, 3), last)


def test_rows_are_ored():
    a = decode_rows(["0 2", "4 1"], 3, 2)
    np.testing.assert_array_equal(a, np.array([[1, 0], [1, 1], [0, 0]], np.uint8))
    assert decode_rows([], 3, 2).sum() == 0


@pytest.mark.parametrize(
    ("rle", "needle"),
    [("5 10", "runs past the image"), ("1 2 3", "odd number"), ("a b", "not a list of integers"),
     ("-3 2", "negative")],
)
def test_bad_rows_name_the_source(rle, needle):
    with pytest.raises(DataError, match=needle) as err:
        decode(rle, 3, 4, source="rows.csv")
    assert str(err.value).startswith("rows.csv: ")


def test_refuses_huge_image_before_allocating():
    with pytest.raises(DataError, match="refusing"):
        decode("0 1", 100_000, 100_000, source="x.csv")


_masks = arrays(
    np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 1)
)


@settings(max_examples=60, deadline=None)
@given(_masks)
def test_round_trip(mask):
    rle = encode(mask)
    np.testing.assert_array_equal(decode(rle, *mask.shape), mask)
    # relative-offset invariant: all numbers non-negative, lengths positive
    if rle != "-1":
        nums = [int(v) for v in rle.split()]
        assert all(v >= 0 for v in nums[0::2]) and all(v > 0 for v in nums[1::2])
        assert sum(nums[1::2]) == int(mask.sum())


def _png_name_of(sample_dir):
    names = {}
    for name in ("stage_1_train_images.csv", "stage_1_test_images.csv"):
        with open(sample_dir / name, newline="") as fh:
            for row in csv.DictReader(fh):
                names[row["ImageId"]] = row["new_filename"]
    return names


def _read_png_mask(path):
    return (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)


def test_first_instance_rows_match_png_masks(sample_dir):
    names = _png_name_of(sample_dir)
    exact = subset = 0
    with open(sample_dir / "rle" / "first-instance-rle.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    for row in rows:
        png = _read_png_mask(sample_dir / "png_masks" / names[row["ImageId"]])
        dec = decode(row["EncodedPixels"], *png.shape)
        assert not (dec & (1 - png)).any(), row["ImageId"]  # never outside the PNG mask
        if dec.sum() == png.sum():
            exact += 1
            np.testing.assert_array_equal(dec, png)
            assert encode(png) == row["EncodedPixels"].strip()
        else:
            subset += 1
            assert 0 < dec.sum() < png.sum()  # first lesion of a multi-lesion image
    assert exact == 7 and subset == 5


def test_kaggle_sample_with_bom_and_fname_mask_header(sample_dir):
    names = _png_name_of(sample_dir)
    raw = (sample_dir / "rle" / "kaggle-train-rle-sample.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    with open(sample_dir / "rle" / "kaggle-train-rle-sample.csv", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["fname", "mask"]
    by_id: dict[str, list[str]] = {}
    for row in rows:
        by_id.setdefault(row["fname"], []).append(row["mask"])
    checked = 0
    for ident, rles in by_id.items():
        name = names.get(ident)
        if name is None or not (sample_dir / "png_masks" / name).exists():
            continue
        png = _read_png_mask(sample_dir / "png_masks" / name)
        np.testing.assert_array_equal(decode_rows(rles, *png.shape), png)
        assert png.sum() > 0
        checked += 1
    assert checked == 5
