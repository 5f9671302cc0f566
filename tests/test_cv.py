"""Cross-validation: cv.json manifest, out-of-fold tuning, ensemble averaging (the
Predictor's members)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from ptxseg import __version__
from ptxseg.cv import (
    MANIFEST,
    CVManifest,
    create_manifest,
    fold_name,
    is_cv_dir,
    read_manifest,
    write_manifest,
)
from ptxseg.errors import ConfigError, RunDirError
from ptxseg.predictor import Member, Predictor, TorchModel
from ptxseg.tune import GridStats, pool_grid_stats, search

# ---------------------------------------------------------------------------------------------
# manifest


def _manifest():
    return CVManifest(k=3, seed=7, assignment={"a": 0, "b": 1, "c": 2, "d": 0})


def test_manifest_round_trip(tmp_path):
    path = write_manifest(tmp_path, _manifest())
    assert path == tmp_path / MANIFEST and is_cv_dir(tmp_path) and not is_cv_dir(tmp_path / "x")
    data = json.loads(path.read_text())
    assert data == {
        "format": "ptxseg-cv",
        "version": 1,
        "ptxseg_version": __version__,
        "k": 3,
        "seed": 7,
        "source": "folds",
        "folds": ["fold-0", "fold-1", "fold-2"],
        "assignment": {"a": 0, "b": 1, "c": 2, "d": 0},
    }
    assert not list(tmp_path.glob(".*.tmp"))
    m = read_manifest(tmp_path)
    assert m == _manifest() and read_manifest(path) == m
    assert m.fold_dir(tmp_path, 1) == tmp_path / "fold-1" and fold_name(2) == "fold-2"
    assert m.val_ids(0) == ["a", "d"]
    assert m.split(0) == {"a": "val", "b": "train", "c": "train", "d": "val"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not a cross-validation manifest (format 'other'"),
        ({"version": 2}, "written by a newer ptxseg (manifest version 2"),
        ({"k": 1}, "'k' must be an integer >= 2, got 1"),
        ({"k": True}, "'k' must be an integer >= 2, got True"),
        ({"seed": "x"}, "'seed' must be an integer or null"),
        ({"folds": ["fold-0", "fold-1"]}, "'folds' must list the 3 fold run folders"),
        ({"folds": ["fold-0", "fold-1", "../x"]}, "'folds': '../x' is not a folder inside"),
        ({"folds": ["fold-0", "fold-1", "/abs"]}, "'folds': '/abs' is not a folder inside"),
        ({"folds": ["fold-0", "fold-0", "f"]}, "'folds': a run folder is listed twice"),
        ({"assignment": {"a": 0, "b": 3}}, "'assignment': image 'b' has fold 3, expected 0..2"),
        ({"assignment": {"a": 0, "b": 1}}, "'assignment': fold 2 has no image"),
        ({"assignment": []}, "'assignment' must map each image id to its validation fold"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, change, message):
    data = _manifest().to_dict() | change
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(RunDirError) as exc:
        read_manifest(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / MANIFEST}: ")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(RunDirError, match="not a cross-validation folder \\(no cv.json\\)"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{nope")
    with pytest.raises(RunDirError, match="cv.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(RunDirError, match="expected a JSON object"):
        read_manifest(tmp_path)


def test_write_manifest_refuses_an_inconsistent_one(tmp_path):
    bad = CVManifest(k=3, seed=0, assignment={"a": 0, "b": 1})  # fold 2 empty
    with pytest.raises(RunDirError, match="fold 2 has no image"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------
# out-of-fold tuning against a direct computation

THRESHOLDS = (0.3, 0.5, 0.7)
AREAS = (0, 3, 6)
EIGHT = np.ones((3, 3), int)  # 8-connectivity, as postprocess.CONNECTIVITY


def _case(seed: int, n: int):
    """``n`` hand-made 10x10 maps: a few blobs of probability, ground truth near them."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n):
        p = rng.random((10, 10)) * 0.35  # background noise up to 0.35
        gt = np.zeros((10, 10), np.uint8)
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, 8, 2)
            h, w = rng.integers(1, 4, 2)
            p[r:r + h, c:c + w] = rng.uniform(0.4, 0.95)
            if rng.random() < 0.7:
                gt[r:r + h, c:c + w] = 1
        if rng.random() < 0.3:  # a missed lesion
            gt[8:10, 0:2] = 1
        maps.append(p.astype(np.float32))
        masks.append(gt)
    return maps, masks


def _reference_pooled_iou(maps, masks, t, a):
    """Pooled IoU of threshold t + removal of components smaller than a, by scipy."""
    tp = pred = true = 0
    for p, g in zip(maps, masks, strict=True):
        m = p > t
        labels, n = ndimage.label(m, structure=EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes[1:] >= a
        m = keep[labels]
        tp += int(np.sum(m & (g > 0)))
        pred += int(m.sum())
        true += int(g.sum())
    return tp / (pred + true - tp)


def test_out_of_fold_tune_equals_a_direct_computation():
    folds = [_case(s, n) for s, n in ((1, 4), (2, 3), (3, 5))]
    per_fold = []
    for maps, masks in folds:
        stats = GridStats(thresholds=THRESHOLDS, areas=AREAS)
        for p, g in zip(maps, masks, strict=True):
            stats.add(p, g)
        per_fold.append(stats)
    all_maps = [p for maps, _ in folds for p in maps]
    all_masks = [g for _, masks in folds for g in masks]
    expected = np.array(
        [[_reference_pooled_iou(all_maps, all_masks, t, a) for a in AREAS] for t in THRESHOLDS]
    )
    i, j = np.unravel_index(int(np.argmax(expected)), expected.shape)  # first on ties
    result = search(pool_grid_stats(per_fold), objective="iou", size=64)
    assert (result.params.binary_threshold, result.params.removal_area) == (THRESHOLDS[i], AREAS[j])
    assert result.score == pytest.approx(expected[i, j], abs=1e-12)
    got = {(t, a): s for t, a, s in result.rows}
    for ti, t in enumerate(THRESHOLDS):
        for ai, a in enumerate(AREAS):
            assert got[(t, a)] == pytest.approx(expected[ti, ai], abs=1e-6)
    # the pooled choice is not the average of the folds' own scores
    per_fold_scores = [search(s).rows for s in per_fold]
    mean_scores = np.mean([[r[2] for r in rows] for rows in per_fold_scores], axis=0)
    assert not np.allclose(mean_scores, [r[2] for r in result.rows])
    pooled = pool_grid_stats(per_fold)
    assert len(pooled) == 12 and pooled.true_area == [int(g.sum()) for g in all_masks]


def test_pooling_refuses_other_grids():
    a, b = GridStats(thresholds=THRESHOLDS, areas=AREAS), GridStats(thresholds=(0.5,), areas=(0,))
    with pytest.raises(ValueError, match="fold 1 was counted on another grid"):
        pool_grid_stats([a, b])
    with pytest.raises(ValueError, match="no folds"):
        pool_grid_stats([])


# ---------------------------------------------------------------------------------------------
# ensembles


class _Tiny(torch.nn.Module):
    """A model of the project's kind: uint8 (B, 1, S, S) in, logits out."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(8.0)

    def forward(self, x):
        return self.conv(x.float() / 255.0 - 0.5)


def _direct(model, x, hflip):
    """Sigmoid probabilities computed directly with the conv's weights (no ptxseg code)."""
    w, b = model.conv.weight.detach(), model.conv.bias.detach()
    xf = torch.from_numpy(x).float() / 255.0 - 0.5
    p = torch.sigmoid(torch.nn.functional.conv2d(xf, w, b, padding=1))
    if hflip:
        pf = torch.sigmoid(torch.nn.functional.conv2d(xf.flip(3), w, b, padding=1)).flip(3)
        p = (p + pf) / 2
    return p[:, 0].numpy().astype(np.float64)


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_ensemble_probabilities_are_the_mean_of_the_members(tta):
    """The Predictor's members averaged: equal to the mean of the members' probabilities
    computed directly (each with its own flip TTA before the average)."""
    models = [_Tiny(s).eval() for s in (1, 2, 3)]
    x = np.random.default_rng(5).integers(0, 256, (2, 1, 16, 16), dtype=np.uint8)
    paths = [f"fold-{i}/best.ckpt" for i in range(3)]
    members = [Member(TorchModel(m), 16, path=p) for m, p in zip(models, paths, strict=True)]
    ens = Predictor(members, tta=tta, workers=0)
    got = ens.batch_probs(x)
    each = [_direct(m, x, tta == "hflip") for m in models]
    assert got.shape == (2, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    # the members really differ (an ensemble of equal maps would prove nothing)
    assert np.abs(each[0] - each[1]).max() > 0.05
    assert ens.record() == {"members": paths, "combine": "mean probability"}
    assert Predictor(members[:1]).record() == {"members": paths[:1], "combine": "single model"}


def test_ensemble_of_other_backends_and_sizes():
    class Fixed:
        device = "cpu"

        def __init__(self, value):
            self.value = value
            self.calls = []

        def probs(self, x, tta="none"):
            self.calls.append(tta)
            return np.full((x.shape[0], 4, 4), self.value, np.float32)

    a, b, c = Fixed(0.2), Fixed(0.6), Fixed(0.7)
    ens = Predictor([Member(a, 4), Member(b, 4), Member(c, 4)], tta="hflip", workers=0)
    x = np.zeros((3, 1, 4, 4), np.uint8)
    np.testing.assert_allclose(ens.batch_probs(x), np.full((3, 4, 4), 0.5), rtol=1e-6)
    assert a.calls == b.calls == c.calls == ["hflip"]  # each member applies the TTA itself
    with pytest.raises(ConfigError) as exc:
        Predictor([Member(a, 4, path="A/best.ckpt"), Member(b, 8, path="B/best.ckpt")])
    assert str(exc.value) == (
        "ensemble members take different input sizes (A/best.ckpt 4 px, B/best.ckpt 8 px); an "
        "ensemble averages maps of one size"
    )


def test_create_manifest_keeps_the_first_one(tmp_path):
    first = _manifest()
    other = CVManifest(k=2, seed=1, assignment={"a": 0, "b": 1})
    assert create_manifest(tmp_path, first) == first
    assert create_manifest(tmp_path, other) == first  # the second process reads the first's
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]
