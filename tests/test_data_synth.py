"""Synthetic dataset: png layout, exact positive count, determinism, a visible lesion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ptxseg.data.sources import load_records
from ptxseg.data.synthetic import draw_case, generate
from ptxseg.errors import DataError


def test_generate_png_layout_and_counts(tmp_path):
    records = generate(tmp_path / "s", n=10, size=64, seed=3, positive_fraction=0.3)
    assert [r.id for r in records] == [f"synth_{i:04d}" for i in range(10)]
    assert sum(r.has_pneumothorax for r in records) == 3
    loaded, layout = load_records(tmp_path / "s")
    assert layout == "png" and loaded == records
    for r in records:
        img = cv2.imread(str(r.image), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(r.mask), cv2.IMREAD_UNCHANGED)
        assert img.shape == mask.shape == (64, 64) and img.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.max() == 255) == r.has_pneumothorax
        assert 10 < img.mean() < 200 and img.std() > 20  # not blank


def test_deterministic_by_seed(tmp_path):
    generate(tmp_path / "a", n=4, size=64, seed=7)
    generate(tmp_path / "b", n=4, size=64, seed=7)
    generate(tmp_path / "c", n=4, size=64, seed=8)
    for name in ("png_images/synth_0002.png", "png_masks/synth_0002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a = cv2.imread(str(tmp_path / "a/png_images/synth_0002.png"))
    c = cv2.imread(str(tmp_path / "c/png_images/synth_0002.png"))
    assert not np.array_equal(a, c)


def test_lesion_is_darker_and_smoother_than_the_other_lung():
    darker, smoother = [], []
    for i in range(12):
        img, mask = draw_case(np.random.default_rng([0, i]), 256, True)
        assert mask.mean() / 255 >= 0.004  # MIN_LESION_FRACTION (0.006), less the slack of a
        # _lesion that gives up after 8 draws
        inner = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
        mirror = inner[:, ::-1] & ~(mask > 0)  # the same place in the other lung
        high = img.astype(float) - cv2.GaussianBlur(img.astype(float), (0, 0), 3)
        darker.append(img[mirror].mean() - img[inner].mean())
        smoother.append(high[mirror].std() - high[inner].std())
    assert min(darker) > 10
    assert np.mean(smoother) > 1


def test_sides_and_sizes_vary():
    sides, areas = set(), []
    for i in range(16):
        _, mask = draw_case(np.random.default_rng([1, i]), 128, True)
        xs = np.nonzero(mask)[1]
        sides.add(bool(xs.mean() > 64))
        areas.append((mask > 0).mean())
    assert sides == {True, False}
    assert max(areas) > 2 * min(areas)


def test_refuses_non_empty_folder_and_bad_args(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate(tmp_path, n=2, size=64)
    assert generate(tmp_path, n=2, size=64, overwrite=True)
    with pytest.raises(ValueError):
        generate(tmp_path / "y", n=0)
    with pytest.raises(ValueError):
        generate(tmp_path / "y", n=2, positive_fraction=1.5)
