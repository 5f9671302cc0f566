"""How long the threshold grid search takes beyond prediction.

Synthetic probability maps (random smooth blobs, like a network's output: mostly near 0, a few
confident regions) at model resolution with a ground-truth blob in half of them. Times:

- ``components_once``: ``ptxseg.tune`` -- one connected-components labelling per (image,
  threshold), all removal areas derived from the component sizes; then the search itself;
- ``naive``: for every (threshold, area) grid point, ``binarize`` (which labels again) and count,
  on a subset, extrapolated to the full set; its counts are checked equal to the fast path's.

Prints one JSON line per figure. Usage::

    python benchmarks/tune_speed.py [--n 2000] [--size 512] [--naive-n 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import numpy as np

from ptxseg.metrics import confusion_counts
from ptxseg.postprocess import PostParams, binarize
from ptxseg.tune import AREAS, THRESHOLDS, GridStats, search


def synthetic_pair(i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth probability map (float32) like a network's output, and its ground truth (uint8),
    deterministic in ``i``: faint smooth background, 1-3 confident Gaussian blobs of random size
    on positives (the first is the lesion), at most one fainter blob on negatives."""
    rng = np.random.default_rng(i)
    low = 64
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32)
    p = cv2.GaussianBlur(rng.uniform(0, 0.06, (low, low)).astype(np.float32), (0, 0), 2)
    gt = np.zeros((low, low), np.float32)
    positive = i % 2 == 0
    n_blobs = int(rng.integers(1, 4)) if positive else int(rng.integers(0, 2))
    for k in range(n_blobs):
        cy, cx = rng.uniform(8, low - 8, 2)
        sigma = rng.uniform(1.0, 6.0)
        amp = rng.uniform(0.5, 1.0) if positive else rng.uniform(0.1, 0.7)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
        p = np.maximum(p, amp * blob)
        if positive and k == 0:
            gt = np.maximum(gt, blob)
    probs = cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR)
    mask = (cv2.resize(gt, (size, size), interpolation=cv2.INTER_LINEAR) > 0.4).astype(np.uint8)
    return np.clip(probs, 0, 1), mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--naive-n", type=int, default=40)
    args = ap.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "opencv_threads": cv2.getNumThreads(),
    }

    stats = GridStats()
    t_reduce = 0.0
    gen = 0.0
    for i in range(args.n):
        t0 = time.perf_counter()
        probs, gt = synthetic_pair(i, args.size)
        t1 = time.perf_counter()
        stats.add(probs, gt)
        t_reduce += time.perf_counter() - t1
        gen += t1 - t0
    t0 = time.perf_counter()
    result = search(stats, mode="pixel", objective="iou", size=args.size)
    t_search_pixel = time.perf_counter() - t0
    t0 = time.perf_counter()
    search(stats, mode="pixel", objective="kaggle", size=args.size)
    search(stats, mode="triplet", objective="kaggle", size=args.size)
    t_search_other = time.perf_counter() - t0
    grid = len(THRESHOLDS) * len(AREAS)
    print(json.dumps({
        "figure": "tune_grid_search_components_once",
        "images": args.n,
        "size": args.size,
        "grid_points": grid,
        "reduce_s": round(t_reduce, 2),
        "search_pixel_iou_s": round(t_search_pixel, 3),
        "search_kaggle_and_triplet_s": round(t_search_other, 3),
        "total_s": round(t_reduce + t_search_pixel, 2),
        "ms_per_image": round(1000 * t_reduce / args.n, 2),
        "best": result.params.to_dict(),
        "score": round(result.score, 4),
        "synthesis_s_not_counted": round(gen, 1),
        "machine": machine,
    }))

    # naive: binarize (re-label) at every grid point, on a subset; check equal counts
    t_naive = 0.0
    for i in range(args.naive_n):
        probs, gt = synthetic_pair(i, args.size)
        t0 = time.perf_counter()
        counts = np.zeros((len(THRESHOLDS), len(AREAS), 2), np.int64)
        for ti, t in enumerate(THRESHOLDS):
            for ai, a in enumerate(AREAS):
                tp, fp, _, _ = confusion_counts(
                    binarize(probs, PostParams(binary_threshold=t, removal_area=a)), gt
                )
                counts[ti, ai] = (tp + fp, tp)
        t_naive += time.perf_counter() - t0
        assert np.array_equal(counts[..., 0], stats.pred[i]), "naive and fast counts differ"
        assert np.array_equal(counts[..., 1], stats.tp[i]), "naive and fast counts differ"
    per_image = t_naive / args.naive_n
    print(json.dumps({
        "figure": "tune_grid_search_naive_relabel_per_area",
        "images_timed": args.naive_n,
        "size": args.size,
        "ms_per_image": round(1000 * per_image, 2),
        "extrapolated_total_s": round(per_image * args.n, 1),
        "speedup": round(per_image / (t_reduce / args.n), 1),
        "counts_equal": True,
        "machine": machine,
    }))


if __name__ == "__main__":
    main()
