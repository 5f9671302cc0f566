"""Overlays a radiologist reads: colour-blind-safe colours, truth and prediction told apart in
grayscale, a whole-image prediction visible, captions on positives and negatives."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ptxseg.errors import PtxsegError
from ptxseg.measures import Geometry, measure
from ptxseg.overlays import (
    PRED_RGB,
    TRUTH_RGB,
    caption_for,
    caption_lines,
    draw_overlay,
    draw_prediction,
    line_width,
)

GRAY = 90


def _image(h=256, w=256):
    return np.full((h, w), GRAY, np.uint8)


def _rect(shape, r0, r1, c0, c1):
    m = np.zeros(shape, np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def _is(rgb, color):
    return np.all(rgb == color, axis=2)


def test_whole_image_prediction_is_visible():
    """A prediction covering everything: tinted all over (filled), and outlined by a frame
    inside the picture, not a line on its edge (the old drawing showed neither)."""
    image = _image()
    full = np.ones((256, 256), np.uint8)
    filled = draw_overlay(image, full, style="fill")
    assert filled.shape == (256, 256, 3)
    changed = np.any(filled != GRAY, axis=2)
    assert changed.all()  # every pixel tinted or outlined
    r, g, b = (filled[128, 128, k].astype(int) for k in range(3))
    assert r > g > b  # vermillion tint in the middle
    outline = draw_overlay(image, full, style="outline")
    w = line_width(image.shape)
    frame = _is(outline, PRED_RGB)
    for band in (frame[:, 1 : 1 + w], frame[:, -1 - w : -1], frame[1 : 1 + w], frame[-1 - w : -1]):
        assert band.any(axis=0 if band.shape[0] > band.shape[1] else 1).all()
    assert not np.any(outline[100:156, 100:156] != GRAY)  # outline style leaves the middle


def test_colours_and_line_styles_tell_truth_from_prediction_in_grayscale():
    image = _image()
    box = _rect((256, 256), 60, 200, 60, 200)
    pred_only = draw_overlay(image, box, style="outline")
    truth_only = draw_overlay(image, None, box, style="outline")
    assert _is(pred_only, PRED_RGB).any() and not _is(pred_only, TRUTH_RGB).any()
    assert _is(truth_only, TRUTH_RGB).any() and not _is(truth_only, PRED_RGB).any()
    # grayscale: the marks are what differs from the radiograph; the prediction's outline is
    # one closed line, the truth's a dashed one (many pieces)
    def pieces(rgb):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        marks = (gray != GRAY).astype(np.uint8)
        return cv2.connectedComponents(marks, connectivity=8)[0] - 1

    assert pieces(pred_only) == 1
    assert pieces(truth_only) >= 8
    # the coloured line stays inside its region; outside it, only a 1 px black halo
    outside = ~box.astype(bool)
    assert not _is(pred_only, PRED_RGB)[outside].any()
    ring = cv2.dilate(box, np.ones((3, 3), np.uint8)).astype(bool) & outside
    assert _is(pred_only, (0, 0, 0))[ring].all()
    assert not np.any(pred_only[outside & ~ring] != GRAY)
    # Okabe-Ito, not red on green
    assert PRED_RGB == (213, 94, 0) and TRUTH_RGB == (86, 180, 233)


def test_masks_at_model_size_over_a_larger_radiograph():
    image = np.full((1024, 768), 100, np.uint8)
    pred = _rect((64, 48), 30, 50, 20, 40)
    out = draw_overlay(image, pred, max_side=384)
    assert out.shape == (64, 48, 3)
    big = draw_overlay(image, cv2.resize(pred, (768, 1024), interpolation=cv2.INTER_NEAREST),
                       max_side=384)
    assert big.shape == (384, 288, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        draw_overlay(image, pred, np.zeros((10, 10), np.uint8))
    with pytest.raises(PtxsegError, match=r"--overlay-style: unknown 'dotted' \(valid: fill, "
                       r"outline\)"):
        draw_overlay(image, pred, style="dotted")


def test_captions():
    assert caption_lines(False, 0.084) == ["no pneumothorax", "max p 0.08"]
    assert caption_lines(True, 0.97, 4512, 12.34, "right") == [
        "PNEUMOTHORAX, patient's right", "12.3 cm² (4,512 px), max p 0.97"
    ]
    assert caption_lines(True, 0.6, 800, None, "both") == [
        "PNEUMOTHORAX, both sides", "800 px, max p 0.60"
    ]
    geo = Geometry(shape=(100, 100), spacing_mm=(2.0, 2.0), spacing_note="x")
    m = measure(_rect((100, 100), 0, 10, 70, 80), geo, max_prob=0.75)  # image right
    assert caption_for(m) == ["PNEUMOTHORAX, patient's left", "4.0 cm² (100 px), max p 0.75"]


def test_caption_flags_cm2_of_a_spacing_too_small_for_a_chest(sample_dir):
    """The real SIIM DICOMs: 1024 px at 0.143 mm is a 14.6 cm wide chest, so their cm² are
    flagged under the area; a plausible spacing is not."""
    from ptxseg.measures import read_geometry
    from ptxseg.overlays import DOUBTFUL_CM2

    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    mask = _rect((1024, 1024), 200, 400, 100, 300)
    siim = caption_for(measure(mask, read_geometry(dicom), max_prob=0.9))
    assert siim[2] == DOUBTFUL_CM2 == "cm² doubtful: pixel spacing too small for a chest"
    # 40,000 px x 0.143 mm x 0.143 mm = 817.96 mm2
    assert siim[1] == "8.2 cm² (40,000 px), max p 0.90"
    plausible = Geometry(shape=(1024, 1024), spacing_mm=(0.35, 0.35), spacing_note="x")
    assert len(caption_for(measure(mask, plausible, max_prob=0.9))) == 2
    assert len(caption_for(measure(mask, None, max_prob=0.9))) == 2  # PNG: pixels only


def test_negative_is_captioned_and_otherwise_untouched():
    image = _image(200, 300)
    empty = np.zeros((200, 300), np.uint8)
    out = draw_prediction(image, empty, measure(empty, max_prob=0.1))
    assert out.shape[0] > 200 and out.shape[1] == 300  # a caption bar under the picture
    assert not np.any(out[:200] != GRAY)  # the radiograph itself unchanged
    bar = out[200:]
    assert (bar == 255).any()  # white text on the dark bar
    positive = _rect((200, 300), 50, 100, 50, 100)
    pos = draw_prediction(image, positive, measure(positive, max_prob=0.9), style="outline")
    # "no pneumothorax" (and its max p line) is two lines; the positive caption as well
    assert pos.shape == out.shape
    assert not np.array_equal(pos[200:], bar)  # other words


# ---------------------------------------------------------------- issue 26, item 28: the text


def _ink(img: np.ndarray) -> np.ndarray:
    return np.asarray(img).max(axis=2) > 100 if img.ndim == 3 else img > 100


def test_cm2_is_drawn_with_a_raised_smaller_2():
    """Hershey fonts have no '²' (cv2.putText draws '?'): put_text draws a smaller digit whose
    top is the top of the line. Measured on the ink: right of where "cm" ends (OpenCV's own
    width of it), the glyph is shorter than a "2" of the line and ends well above the
    baseline."""
    from ptxseg.overlays import put_text

    scale, thick, y = 1.0, 2, 60
    canvas = np.zeros((90, 200), np.uint8)
    put_text(canvas, "cm²", (10, y), scale, 255, thick)
    (cm_w, _), _ = cv2.getTextSize("cm", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    sup = _ink(canvas[:, 10 + cm_w:])
    rows = np.flatnonzero(sup.any(axis=1))
    assert rows.size, "nothing drawn after cm"
    plain = np.zeros_like(canvas)
    cv2.putText(plain, "2", (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    two = np.flatnonzero(_ink(plain).any(axis=1))
    (_, cap), _ = cv2.getTextSize("M", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    assert rows[-1] - rows[0] < 0.8 * (two[-1] - two[0])  # smaller
    assert rows[-1] < y - 0.3 * cap  # raised: it ends well above the baseline
    assert abs(rows[0] - two[0]) <= 3  # its top at the top of the line
    fallback = np.zeros_like(canvas)
    cv2.putText(fallback, "cm²", (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick,
                cv2.LINE_AA)  # what cv2 alone draws: "cm??"
    assert not np.array_equal(_ink(fallback), _ink(canvas))


def test_every_overlay_png_says_research_use_only():
    """predict's and serve's overlays (draw_prediction) end their caption with the notice,
    drawn in gray below the white caption lines; a panel of evaluate's grid leaves it to the
    figure's title, which says it once."""
    from ptxseg.figures import make_panel, overlay_figure, pyplot
    from ptxseg.metrics import image_stats
    from ptxseg.overlays import NOTICE_RGB, RESEARCH_USE

    assert RESEARCH_USE == "research use only, not for diagnosis"
    image = _image(300, 300)
    mask = _rect((300, 300), 100, 150, 100, 150)
    m = measure(mask, max_prob=0.8)
    with_notice = draw_prediction(image, mask, m)
    without = draw_overlay(image, mask, caption=caption_for(m), notice=False)
    extra = with_notice.shape[0] - without.shape[0]
    assert extra > 0 and np.array_equal(with_notice[: without.shape[0]], without)
    last = with_notice[without.shape[0]:]
    assert _ink(last).sum() > 100 and last.max() == NOTICE_RGB[0]  # gray text, no white
    panel = make_panel(image, mask, mask, image_stats("x", mask, mask, 0.8))
    assert panel.rgb.shape[0] < with_notice.shape[0] + 300  # no notice row in the panel
    fig = overlay_figure([panel], "best")
    try:
        assert fig.get_suptitle().endswith(RESEARCH_USE)
    finally:
        pyplot().close(fig)
