"""Horizontal-flip test-time augmentation: a mirror-symmetric network gives exactly the same
probabilities with and without it, an ordinary one gives the average of the image and its
mirror (computed independently), and `ptxseg predict --tta hflip` writes masks from that
average."""

from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ptxseg.cli import main
from ptxseg.model import build_model
from ptxseg.postprocess import PostParams
from tests.conftest import make_run, tiny_config
from tests.test_predict import SIZE, expected_probs, file_probs


class MirrorSymmetric(nn.Module):
    """``g(x) = (f(x) + flip(f(flip(x)))) / 2``, so that ``g(flip(x)) == flip(g(x))`` exactly
    (float addition commutes)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.f(x) + self.f(x.flip(3)).flip(3))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    return build_model(tiny_config().model, pretrained=False).eval()


@pytest.fixture(scope="module")
def entries(sample_dir):
    pngs = sorted((sample_dir / "png_images").glob("*.png"))[:3]
    return [(p.stem, p) for p in pngs]


def _probs(model, entries, tta, batch_size=2):
    got = file_probs(model, entries, batch_size=batch_size, tta=tta)
    assert [item.id for item, _ in got] == [e[0] for e in entries]
    return np.stack([p for _, p in got])


def test_mirror_symmetric_model_is_unchanged_by_hflip(net, entries):
    sym = MirrorSymmetric(net).eval()
    plain = _probs(sym, entries, "none")
    flipped = _probs(sym, entries, "hflip")
    assert plain.std() > 1e-4  # not a constant map: the check has something to compare
    np.testing.assert_array_equal(flipped, plain)
    # and the maps really are mirror images of the flipped input's
    x = np.stack([cv2.resize(cv2.imread(str(p), 0), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                  for _, p in entries])
    with torch.no_grad():
        mirrored = torch.sigmoid(sym(torch.from_numpy(x[:, None, :, ::-1].copy()))).numpy()
    np.testing.assert_allclose(mirrored[:, 0, :, ::-1], plain, atol=1e-6)


def test_ordinary_model_gets_the_average_of_image_and_mirror(net, entries):
    plain = _probs(net, entries, "none")
    tta = _probs(net, entries, "hflip")
    x = np.stack([cv2.resize(cv2.imread(str(p), 0), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                  for _, p in entries])
    xt = torch.from_numpy(x[:, None])
    with torch.no_grad():
        a = torch.sigmoid(net(xt)).numpy()[:, 0]
        b = torch.sigmoid(net(xt.flip(3))).numpy()[:, 0, :, ::-1]
    np.testing.assert_allclose(tta, (a + b) / 2, atol=1e-6)
    np.testing.assert_allclose(plain, a, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-3  # the augmentation changes this model's output


def test_unknown_tta_is_refused(net, entries):
    from ptxseg.errors import PtxsegError

    with pytest.raises(PtxsegError) as exc:  # the command line's own message
        _probs(net, entries, "vflip")
    assert str(exc.value) == "--tta: unknown 'vflip' (valid: none, hflip)"


def test_cli_tta_hflip_writes_masks_of_the_averaged_probabilities(sample_dir, tmp_path):
    run = tmp_path / "run"
    model = make_run(run, thresholds=PostParams(binary_threshold=0.5, size=SIZE))
    png = sorted((sample_dir / "png_images").glob("*.png"))[4]
    small = tmp_path / "x.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(png), 0), (200, 240)))
    gray = cv2.imread(str(small), 0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["predict", str(run), str(small), "--out", str(tmp_path / "o"), "--tta",
                   "hflip", "--workers", "0", "--batch-size", "1"])
    assert rc == 0
    mask = cv2.imread(str(tmp_path / "o" / "masks" / "x.png"), 0) // 255
    with_tta = (expected_probs(model, gray, "hflip") > 0.5).astype(np.uint8)
    without = (expected_probs(model, gray) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(mask, with_tta)
    assert (with_tta != without).any()  # so the comparison above tells the two apart
    assert json.loads((tmp_path / "o" / "predict.json").read_text())["tta"] == "hflip"
