"""The grid search: counts agree with binarize, constructed cases find their known optimum.
(`ptxseg tune` end to end, writing thresholds.json, is tested in test_evaluate.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from ptxseg.errors import PtxsegError
from ptxseg.metrics import confusion_counts
from ptxseg.postprocess import PostParams, binarize
from ptxseg.tune import AREAS, THRESHOLDS, GridStats, grid_counts, search


def smooth_blobs(rng: np.random.Generator, size: int, n_blobs: int = 6) -> np.ndarray:
    """A probability map of random Gaussian blobs of several sizes plus faint noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    p = np.zeros((size, size), np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(1.5, size / 6)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        p = np.maximum(p, rng.uniform(0.2, 1.0) * blob)
    return np.clip(p + rng.uniform(0, 0.03, p.shape).astype(np.float32), 0, 1)


@pytest.mark.parametrize(("low", "high"), [(0.015, 0.035), (0.935, 0.97)])
def test_the_default_grid_reaches_below_the_papers_lowest_threshold_and_up_to_095(low, high):
    """A lesion at probability ``high`` on a background at ``low``: only a threshold between
    the two separates them, so the default grid must hold one (the paper's started at 0.05;
    models trained with Dice often put lesions below it)."""
    p = np.full((64, 64), low, np.float32)
    gt = np.zeros((64, 64), np.uint8)
    p[10:30, 10:30], gt[10:30, 10:30] = high, 1
    stats = GridStats()  # the default THRESHOLDS and AREAS
    stats.add(p, gt)
    result = search(stats, objective="iou")
    assert result.score == pytest.approx(1.0)
    assert low < result.params.binary_threshold < high


def test_the_default_grid_removes_components_up_to_4096_px_at_512():
    """A 60x60 (3,600 px) false blob beside an 80x80 (6,400 px) lesion at 512 px: only a
    removal area between the two is perfect, and the default grid has 4096 (the paper's
    largest)."""
    p = np.zeros((512, 512), np.float32)
    gt = np.zeros((512, 512), np.uint8)
    p[20:100, 20:100], gt[20:100, 20:100] = 0.9, 1
    p[300:360, 300:360] = 0.9
    stats = GridStats()
    stats.add(p, gt)
    result = search(stats, objective="iou", size=512)
    assert result.score == pytest.approx(1.0)
    assert result.params.removal_area == 4096


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_counts_equal_binarize_everywhere(seed):
    """The components-once counts equal what binarize gives at every grid point."""
    rng = np.random.default_rng(seed)
    probs = smooth_blobs(rng, 96, n_blobs=10)
    gt = (smooth_blobs(rng, 96, n_blobs=3) > 0.4).astype(np.uint8)
    areas = (0, 3, 20, 100, 400, 2000)
    pred, tp = grid_counts(probs, gt, THRESHOLDS, areas)
    assert pred.shape == tp.shape == (len(THRESHOLDS), len(areas))
    assert pred[0, 0] > pred[-1, -1]  # the case is not trivial
    for i, t in enumerate(THRESHOLDS):
        for j, a in enumerate(areas):
            mask = binarize(probs, PostParams(binary_threshold=t, removal_area=a))
            c_tp, c_fp, _, _ = confusion_counts(mask, gt)
            assert (pred[i, j], tp[i, j]) == (c_tp + c_fp, c_tp), (t, a)


def test_grid_counts_empty_map():
    pred, tp = grid_counts(np.zeros((16, 16), np.float32), np.ones((16, 16), np.uint8))
    assert not pred.any() and not tp.any()


def _pixel_case(positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """128x128. Lesion (GT) 20x20 = 400 px: a 0.9 core and a 0.42 rim; a 30x30 region at 0.37
    outside the lesion; four 12x12 (144 px) specks at 0.9. Known optimum: threshold 0.4 (above
    0.37, below 0.42), removal area 256 (removes the 144-px specks, keeps the 400-px lesion)."""
    p = np.zeros((128, 128), np.float32)
    gt = np.zeros((128, 128), np.uint8)
    for y, x in ((100, 5), (100, 30), (5, 100), (30, 100)):
        p[y : y + 12, x : x + 12] = 0.9
    if positive:
        p[10:30, 10:30] = 0.42
        p[13:27, 13:27] = 0.9
        gt[10:30, 10:30] = 1
        p[60:90, 60:90] = 0.37
    return p, gt


@pytest.mark.parametrize("objective", ["iou", "kaggle"])
def test_pixel_search_finds_known_optimum(objective):
    stats = GridStats()
    for i in range(6):
        stats.add(*_pixel_case(positive=i % 2 == 0))
    result = search(stats, mode="pixel", objective=objective, size=128)
    assert result.params == PostParams(binary_threshold=0.4, removal_area=256, size=128)
    assert result.score == pytest.approx(1.0)
    scores = {(r[0], r[1]): r[2] for r in result.rows}
    assert len(scores) == len(THRESHOLDS) * len(AREAS)
    assert sum(s == 1.0 for s in scores.values()) == 1  # the optimum is unique
    assert scores[(0.35, 256)] < 1 and scores[(0.45, 256)] < 1
    assert scores[(0.4, 0)] < 1 and scores[(0.4, 512)] < 1


def test_pixel_search_scores_match_binarize():
    """The table's pooled IoU equals binarize + metrics on the same maps at every point."""
    rng = np.random.default_rng(5)
    maps = [smooth_blobs(rng, 64) for _ in range(4)]
    gts = [(smooth_blobs(rng, 64, 2) > 0.5).astype(np.uint8) for _ in range(4)]
    stats = GridStats(areas=(0, 10, 50))
    for p, g in zip(maps, gts, strict=True):
        stats.add(p, g)
    result = search(stats, mode="pixel", objective="iou")
    for t, a, score in result.rows[::7]:
        tp = fp = fn = 0
        for p, g in zip(maps, gts, strict=True):
            c = confusion_counts(binarize(p, PostParams(binary_threshold=t, removal_area=a)), g)
            tp, fp, fn = tp + c[0], fp + c[1], fn + c[2]
        assert score == pytest.approx(tp / (tp + fp + fn), abs=1e-6)


def _triplet_case(positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positive: lesion core 20x30 (600 px) at 0.9 + a separate 10x10 lesion fragment at 0.42,
    and a 20x20 region at 0.37 outside the lesion. Negative: a 15x20 (300 px) blob at 0.83.
    Pixel mode cannot be perfect (removing the 300-px blob needs area >= 512 or threshold
    >= 0.85, both lose the fragment); triplet (top 0.4, min area 512, bottom 0.4) is."""
    p = np.zeros((128, 128), np.float32)
    gt = np.zeros((128, 128), np.uint8)
    if positive:
        p[10:30, 10:40] = 0.9
        p[60:70, 60:70] = 0.42
        gt[10:30, 10:40] = 1
        gt[60:70, 60:70] = 1
        p[90:110, 90:110] = 0.37
    else:
        p[50:65, 50:70] = 0.83
    return p, gt


def test_triplet_search_finds_known_optimum():
    stats = GridStats()
    for i in range(6):
        stats.add(*_triplet_case(positive=i % 3 == 0))
    result = search(stats, mode="triplet", objective="kaggle", size=128)
    expected = PostParams(
        mode="triplet", top_threshold=0.4, min_area=512, bottom_threshold=0.4, size=128
    )
    assert result.params == expected
    assert result.score == pytest.approx(1.0)
    assert all(r[2] <= r[0] for r in result.rows)  # bottom <= top
    assert search(stats, mode="pixel", objective="kaggle").score < 0.99
    # the chosen rule, applied by binarize, reproduces the score
    for i in range(6):
        p, g = _triplet_case(positive=i % 3 == 0)
        assert np.array_equal(binarize(p, result.params), g)


def test_search_rejects_bad_arguments():
    stats = GridStats()
    with pytest.raises(ValueError, match="no images"):
        search(stats)
    stats.add(*_pixel_case(True))
    with pytest.raises(PtxsegError, match=r"--objective: unknown 'dice' \(valid: iou, kaggle\)"):
        search(stats, objective="dice")
    with pytest.raises(PtxsegError, match=r"--mode: unknown 'double' \(valid: pixel, triplet\)"):
        search(stats, mode="double")


@pytest.mark.parametrize("size", [64, 128, 256, 512, 1024])
def test_area_grid_is_the_same_fractions_of_every_input_size(size):
    """The removal areas are the paper-sized grid (0..4096 px at 512 px) as fractions of the
    image: 4096 px is 1/64 of a 512 px input, never a quarter of a 128 px one."""
    from ptxseg.tune import areas_for

    areas = areas_for(size)
    assert areas_for(512) == AREAS
    assert len(areas) == len(AREAS)
    for a, ref in zip(areas, AREAS, strict=True):
        assert a / size**2 == pytest.approx(ref / 512**2)
    assert max(areas) / size**2 == pytest.approx(1 / 64)
