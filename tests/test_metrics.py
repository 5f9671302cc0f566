"""Every metric against scikit-learn on the same predictions, and hand-worked edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    confusion_matrix,
    jaccard_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from ptxseg.metrics import ImageStats, confusion_counts, image_stats, roc_auc, summarize


def _random_set(seed: int, n: int = 12, shape=(16, 16)):
    """Random masks with empty/non-empty truths and predictions, and a score per image."""
    rng = np.random.default_rng(seed)
    gts, preds, scores = [], [], []
    for i in range(n):
        gt = (rng.random(shape) < 0.3).astype(np.uint8) if i % 3 else np.zeros(shape, np.uint8)
        pred = (rng.random(shape) < 0.3).astype(np.uint8) if i % 4 else np.zeros(shape, np.uint8)
        gts.append(gt)
        preds.append(pred)
        scores.append(float(np.round(rng.random(), 1)))  # rounded: ties on purpose
    stats = [
        image_stats(f"im{i}", p, g, s)
        for i, (p, g, s) in enumerate(zip(preds, gts, scores, strict=True))
    ]
    return gts, preds, scores, stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_against_sklearn(seed):
    gts, preds, _, stats = _random_set(seed)
    y = np.concatenate([g.ravel() for g in gts])
    p = np.concatenate([q.ravel() for q in preds])
    m = summarize(stats)["pooled"]
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[0, 1]).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert all(type(m[k]) is int for k in ("tn", "fp", "fn", "tp"))
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, average="binary", zero_division=0)
    assert m["precision"] == pytest.approx(prec, abs=1e-12)
    assert m["recall"] == pytest.approx(rec, abs=1e-12)
    assert m["f1"] == pytest.approx(f1, abs=1e-12)
    assert m["iou"] == pytest.approx(jaccard_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx((y == p).mean(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_against_sklearn(seed):
    gts, preds, _, stats = _random_set(seed)
    dice, dice_pos, iou_pos = [], [], []
    for g, p in zip(gts, preds, strict=True):
        if not g.any() and not p.any():
            dice.append(1.0)  # SIIM-ACR: empty on empty scores 1
        else:
            d = precision_recall_fscore_support(
                g.ravel(), p.ravel(), average="binary", zero_division=0
            )[2]
            dice.append(d)
        if g.any():
            dice_pos.append(dice[-1])
            iou_pos.append(jaccard_score(g.ravel(), p.ravel()))
    m = summarize(stats)["per_image"]
    assert m["kaggle_dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    assert m["dice_positive_mean"] == pytest.approx(np.mean(dice_pos), abs=1e-12)
    assert m["iou_positive_mean"] == pytest.approx(np.mean(iou_pos), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_against_sklearn(seed):
    gts, preds, scores, stats = _random_set(seed)
    truth = np.array([g.any() for g in gts])
    called = np.array([p.any() for p in preds])
    tn, fp, fn, tp = confusion_matrix(truth, called, labels=[False, True]).ravel()
    d = summarize(stats)["detection"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (tp, fp, fn, tn)
    assert d["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert d["specificity"] == pytest.approx(tn / (tn + fp))
    assert d["auc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_roc_auc_ties_and_large_random():
    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + y * 0.3, 2)  # many ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [True, True])


def test_empty_on_empty():
    z = np.zeros((4, 4), np.uint8)
    s = summarize([image_stats("a", z, z, 0.1)])
    assert s["n_images"] == 1 and s["n_positive"] == 0
    assert s["pooled"]["accuracy"] == 1.0 and s["pooled"]["tn"] == 16
    for key in ("recall", "precision", "f1", "iou"):
        assert s["pooled"][key] is None and f"pooled.{key}" in s["reasons"]
    assert s["per_image"]["kaggle_dice"] == 1.0
    assert s["per_image"]["dice_positive_mean"] is None
    assert s["reasons"]["per_image.dice_positive_mean"] == "no positive image"
    assert s["detection"]["sensitivity"] is None and s["detection"]["specificity"] == 1.0
    assert s["detection"]["auc"] is None and "no positive image" in s["reasons"]["detection.auc"]


def test_all_negative_set_with_false_positive():
    z = np.zeros((4, 4), np.uint8)
    fp = z.copy()
    fp[0, :2] = 1
    s = summarize([image_stats("a", z, z, 0.1), image_stats("b", fp, z, 0.9)])
    assert s["pooled"]["precision"] == 0.0 and s["pooled"]["iou"] == 0.0 and s["pooled"]["fp"] == 2
    assert s["pooled"]["recall"] is None
    assert s["per_image"]["kaggle_dice"] == 0.5  # (1 + 0) / 2
    assert s["detection"]["specificity"] == 0.5


def test_all_positive_set_like_ptx498():
    """PTX-498 has no negative image: specificity and AUC are null with a reason, no crash."""
    g = np.zeros((4, 4), np.uint8)
    g[:2, :2] = 1  # 4 px
    p = np.zeros((4, 4), np.uint8)
    p[:2, :1] = 1  # 2 px inside
    s = summarize([image_stats("a", p, g, 0.8), image_stats("b", np.zeros_like(g), g, 0.2)])
    assert s["n_positive"] == 2
    assert s["pooled"]["tp"] == 2 and s["pooled"]["fn"] == 6 and s["pooled"]["fp"] == 0
    assert s["pooled"]["recall"] == 0.25 and s["pooled"]["precision"] == 1.0
    assert s["pooled"]["f1"] == pytest.approx(0.4) and s["pooled"]["iou"] == 0.25
    # per image: a: dice 2*2/(2+4) = 2/3, iou 0.5 ; b: dice 0, iou 0
    assert s["per_image"]["kaggle_dice"] == pytest.approx(1 / 3)
    assert s["per_image"]["iou_positive_mean"] == pytest.approx(0.25)
    d = s["detection"]
    assert d["sensitivity"] == 0.5 and d["specificity"] is None and d["auc"] is None
    assert s["reasons"]["detection.specificity"] == "no negative image"
    json.dumps(s, allow_nan=False)  # no NaN anywhere


def test_counts_do_not_overflow_int32():
    big = ImageStats("x", tp=2**31, fp=2**31, fn=2**31, tn=2**31, max_prob=1.0)
    s = summarize([big, big])
    assert s["pooled"]["tp"] == 2**32 and s["pooled"]["iou"] == pytest.approx(1 / 3)


def test_confusion_counts_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_counts(np.zeros((2, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# bootstrap confidence intervals


def _loop_bootstrap(stats, n_resamples, seed, level=0.95):
    """The direct bootstrap: resample b draws rng.integers(0, n, size=n) in turn, each
    resample's metrics come from ``summarize`` of the drawn images (the point-estimate code),
    undefined ones skipped; the interval is numpy's percentile of the defined ones."""
    rng = np.random.default_rng(seed)
    keys = {
        "pooled.f1": ("pooled", "f1"),
        "pooled.iou": ("pooled", "iou"),
        "per_image.kaggle_dice": ("per_image", "kaggle_dice"),
        "detection.sensitivity": ("detection", "sensitivity"),
        "detection.specificity": ("detection", "specificity"),
    }
    values = {k: [] for k in keys}
    for _ in range(n_resamples):
        idx = rng.integers(0, len(stats), size=len(stats))
        m = summarize([stats[i] for i in idx])
        for k, (section, name) in keys.items():
            if m[section][name] is not None:
                values[k].append(m[section][name])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {k: (list(np.percentile(v, q)) if v else None) for k, v in values.items()}, {
        k: len(v) for k, v in values.items()
    }


@pytest.mark.parametrize("n, n_resamples, seed", [(7, 300, 0), (12, 40, 5)])
def test_bootstrap_cis_against_a_direct_loop(n, n_resamples, seed):
    from ptxseg.metrics import bootstrap_cis

    *_, stats = _random_set(seed, n=n)
    got = bootstrap_cis(stats, n_resamples=n_resamples, seed=seed)
    expected, defined = _loop_bootstrap(stats, n_resamples, seed)
    assert got["n_resamples"] == n_resamples and got["seed"] == seed and got["level"] == 0.95
    assert got["n_defined"] == defined
    for key, interval in expected.items():
        assert got["intervals"][key] == pytest.approx(interval, abs=1e-12), key
        lo, hi = got["intervals"][key]
        assert lo <= hi
    # seeded: same seed, same intervals; another seed, other intervals
    assert bootstrap_cis(stats, n_resamples=n_resamples, seed=seed) == got
    other = bootstrap_cis(stats, n_resamples=n_resamples, seed=seed + 1)
    assert other["intervals"] != got["intervals"]
    json.dumps(got, allow_nan=False)  # fits metrics.json


def test_bootstrap_cis_undefined_metrics_and_levels():
    from ptxseg.metrics import bootstrap_cis

    g = np.zeros((8, 8), np.uint8)
    g[:4, :4] = 1
    # every image positive: specificity undefined in every resample
    stats = [image_stats(f"p{i}", g if i % 2 else np.zeros_like(g), g, 0.5) for i in range(5)]
    got = bootstrap_cis(stats, n_resamples=50, seed=0)
    assert got["intervals"]["detection.specificity"] is None
    assert got["n_defined"]["detection.specificity"] == 0
    assert got["n_defined"]["detection.sensitivity"] == 50
    # 2 of 5 images found: sensitivity of a resample is k/5 for some k, so are the bounds
    lo, hi = got["intervals"]["detection.sensitivity"]
    assert 0.0 <= lo <= 0.4 <= hi <= 1.0
    # a wider level gives a wider (or equal) interval
    wide = bootstrap_cis(stats, n_resamples=50, seed=0, level=0.99)["intervals"]
    assert wide["pooled.iou"][0] <= got["intervals"]["pooled.iou"][0]
    assert wide["pooled.iou"][1] >= got["intervals"]["pooled.iou"][1]
    assert all(v is None for v in bootstrap_cis([], n_resamples=10)["intervals"].values())
    with pytest.raises(ValueError, match="level"):
        bootstrap_cis(stats, level=95)
