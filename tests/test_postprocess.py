"""The one binarize rule: pixel mode (threshold + small-component removal) and triplet mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptxseg.errors import DataError
from ptxseg.postprocess import (
    PostParams,
    area_scale,
    binarize,
    load_params,
    save_params,
    with_model_size,
)


def _blobs() -> np.ndarray:
    """A 20x20 map: a 3x3 blob at 0.9 (9 px), a 2x2 blob at 0.6 (4 px), one pixel at 0.3."""
    p = np.zeros((20, 20), np.float32)
    p[2:5, 2:5] = 0.9
    p[10:12, 10:12] = 0.6
    p[17, 17] = 0.3
    return p


@pytest.mark.parametrize(
    ("threshold", "area", "expected"),
    [
        (0.5, 0, 13),  # both blobs
        (0.7, 0, 9),  # only the strong blob
        (0.2, 0, 14),  # everything
        (0.2, 4, 13),  # the single pixel (1 px < 4) goes, the 4-px blob stays (>= 4)
        (0.2, 5, 9),  # the 4-px blob goes too
        (0.2, 10, 0),  # nothing is 10 px
        (0.9, 0, 0),  # strictly greater than the threshold
    ],
)
def test_pixel_mode(threshold, area, expected):
    out = binarize(_blobs(), PostParams(binary_threshold=threshold, removal_area=area))
    assert out.dtype == np.uint8 and out.shape == (20, 20)
    assert set(np.unique(out)) <= {0, 1}
    assert int(out.sum()) == expected


def test_pixel_mode_uses_8_connectivity():
    p = np.zeros((6, 6), np.float32)
    p[1, 1] = p[2, 2] = p[3, 3] = 0.9  # a diagonal line: one 8-connected component of 3
    out = binarize(p, PostParams(binary_threshold=0.5, removal_area=3))
    assert int(out.sum()) == 3


def test_area_scale_scales_removal_area():
    p = _blobs()
    params = PostParams(binary_threshold=0.5, removal_area=2, size=10)  # 2 px at 10x10
    scale = area_scale(params, 20, 20)
    assert scale == 4.0
    # scaled: components < 8 px removed -> the 4-px blob goes, the 9-px blob stays
    assert int(binarize(p, params, area_scale=scale).sum()) == 9
    assert int(binarize(p, params).sum()) == 13
    assert area_scale(PostParams(), 20, 20) == 1.0  # size unknown: areas are the map's own


@pytest.mark.parametrize(
    ("top", "min_area", "bottom", "expected"),
    [
        (0.8, 9, 0.5, 13),  # 9 px > 0.8 -> positive; mask = pixels > 0.5
        (0.8, 10, 0.5, 0),  # fewer than 10 px above 0.8 -> empty
        (0.8, 9, 0.2, 14),
        (0.95, 0, 0.5, 0),  # nothing above the top threshold: empty even with min_area 0
        (0.5, 13, 0.1, 14),
    ],
)
def test_triplet_mode(top, min_area, bottom, expected):
    params = PostParams(
        mode="triplet", top_threshold=top, min_area=min_area, bottom_threshold=bottom
    )
    out = binarize(_blobs(), params)
    assert out.dtype == np.uint8
    assert int(out.sum()) == expected


def test_triplet_min_area_scaled():
    params = PostParams(
        mode="triplet", top_threshold=0.8, min_area=3, bottom_threshold=0.5, size=10
    )
    assert int(binarize(_blobs(), params, area_scale=4.0).sum()) == 0  # needs 12 px > 0.8
    assert int(binarize(_blobs(), params, area_scale=3.0).sum()) == 13  # needs 9


def test_invalid_params():
    with pytest.raises(ValueError, match="binary_threshold"):
        PostParams(binary_threshold=1.5)
    with pytest.raises(ValueError, match="removal_area"):
        PostParams(removal_area=-1)
    with pytest.raises(ValueError, match="mode"):
        PostParams(mode="fancy")  # type: ignore[arg-type]


def test_save_load_roundtrip_pixel(tmp_path):
    path = tmp_path / "thresholds.json"
    params = PostParams(binary_threshold=0.05, removal_area=256, size=512)
    save_params(params, path, extra={"objective": "iou", "score": 0.42, "mode": "ignored"})
    obj = json.loads(path.read_text())
    assert list(obj)[:2] == ["binary_threshold", "removal_area"]  # the paper's keys first
    assert obj["binary_threshold"] == 0.05 and obj["removal_area"] == 256
    assert obj["mode"] == "pixel" and obj["size"] == 512 and obj["score"] == 0.42
    assert load_params(path) == params


def test_save_load_roundtrip_triplet(tmp_path):
    path = tmp_path / "t.json"
    params = PostParams(
        mode="triplet", top_threshold=0.75, min_area=512, bottom_threshold=0.4, size=512
    )
    save_params(params, path)
    obj = json.loads(path.read_text())
    assert obj["top_threshold"] == 0.75 and obj["min_area"] == 512 and "binary_threshold" not in obj
    assert load_params(path) == params


def test_load_paper_style_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"binary_threshold": 0.05, "removal_area": 100.0}')
    params = load_params(path)
    assert params == PostParams(binary_threshold=0.05, removal_area=100)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "thresholds file not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"removal_area": 3}', "missing key binary_threshold"),
        ('{"binary_threshold": 2}', "binary_threshold: must be a number in [0, 1]"),
        ('{"mode": "triplet", "top_threshold": 0.5}', "missing keys min_area, bottom_threshold"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as exc:
        load_params(path)
    assert str(exc.value).startswith(str(path) + ": ")
    assert message in str(exc.value)


def test_with_model_size_fills_only_a_missing_size():
    bare = PostParams(binary_threshold=0.3, removal_area=100)
    assert with_model_size(bare, 512).size == 512
    assert area_scale(with_model_size(bare, 512), 1024, 1024) == 4.0
    sized = PostParams(binary_threshold=0.3, removal_area=100, size=256)
    assert with_model_size(sized, 512) is sized


def test_describe_says_no_component_removal():
    assert PostParams().describe() == "probs > 0.5, no component removal"
    assert PostParams(binary_threshold=0.5, size=128).describe() == (
        "probs > 0.5, no component removal"
    )
    assert PostParams(binary_threshold=0.3, removal_area=64, size=128).describe() == (
        "probs > 0.3, remove components < 64 px (areas at 128 px)"
    )
    triplet = PostParams(mode="triplet", top_threshold=0.7, min_area=0, bottom_threshold=0.4)
    assert triplet.describe() == "empty unless a pixel > 0.7, then probs > 0.4"
    triplet = PostParams(
        mode="triplet", top_threshold=0.7, min_area=32, bottom_threshold=0.4, size=64
    )
    assert triplet.describe() == "empty unless >= 32 px > 0.7, then probs > 0.4 (areas at 64 px)"
