"""Overlays a radiologist reads: the radiograph, the predicted region, the ground truth where
there is one, and a caption with the finding.

Conventions:

- colours from the Okabe-Ito palette, told apart with any colour vision: prediction
  vermillion :data:`PRED_RGB`, ground truth sky blue :data:`TRUTH_RGB` (never red on green);
- told apart in grayscale too, by line style: the prediction's outline is solid (and in the
  ``fill`` style, :class:`OverlayStyle`, its region tinted), the truth's outline is dashed and
  never filled;
- every outline has a thin black halo, so it shows on bright bone as on dark lung;
- outlines are drawn on the inner side of their region's boundary: a prediction that covers
  the whole image is a frame inside the picture, not a line on its edge that a border hides,
  and in the ``fill`` style the whole picture is tinted;
- the caption (a bar under the image, :func:`caption_lines`) says the finding: ``no
  pneumothorax`` on a negative, else ``PNEUMOTHORAX``, the side, the area (cm² where known,
  pixels) and the maximum probability; with a ground truth, a legend of the two line styles;
  and, last, :data:`RESEARCH_USE` ("research use only, not for diagnosis"), on every overlay
  PNG a reader may take out of its context (predict's, serve's; evaluate's grids say it once
  in their title).

Text is drawn with OpenCV's Hershey font (ASCII), the superscripts of "cm²" as a smaller digit
raised above the line (:func:`put_text`), so a PNG reads as the viewer and the report write;
names from the data are never drawn into the picture (the report writes them as figure titles).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ptxseg.choices import Choice
from ptxseg.measures import LesionMeasures

#: Okabe-Ito vermillion and sky blue (Okabe & Ito 2008, "Color Universal Design")
PRED_RGB = (213, 94, 0)
TRUTH_RGB = (86, 180, 233)
HALO_RGB = (0, 0, 0)
BAR_RGB = (32, 32, 32)
TEXT_RGB = (255, 255, 255)
FILL_ALPHA = 0.35


class OverlayStyle(Choice):
    """How the predicted region is drawn (``--overlay-style``): tinted and outlined, or
    outlined only (the radiograph under it left untouched)."""

    FILL = "fill"
    OUTLINE = "outline"


STYLES = OverlayStyle.values()

DOUBTFUL_CM2 = "cm² doubtful: pixel spacing too small for a chest"
#: the last line of every overlay's caption
RESEARCH_USE = "research use only, not for diagnosis"
NOTICE_RGB = (190, 190, 190)
#: characters drawn as a raised, smaller digit (Hershey fonts have no superscripts)
SUPERSCRIPTS = {"\u00b2": "2", "\u00b3": "3"}
SUPERSCRIPT_SCALE = 0.6
FONT = cv2.FONT_HERSHEY_SIMPLEX

SIDE_WORDS = {
    "right": "patient's right",
    "left": "patient's left",
    "both": "both sides",
    "n/a": "side n/a",
}


def line_width(shape: Sequence[int]) -> int:
    """Outline width in pixels for an image of ``shape``: 2 px up to 400 px, then 1 more per
    200 px."""
    return max(2, round(max(shape[:2]) / 200))


def _fit(max_side: int | None, min_side: int | None, image: np.ndarray, *masks: np.ndarray):
    """``image`` and ``masks`` resized so that the longest side is at most ``max_side`` and at
    least ``min_side`` (image: area / cubic interpolation, masks: nearest)."""
    h, w = image.shape[:2]
    longest = max(h, w)
    if max_side is not None and longest > max_side:
        scale, interp = max_side / longest, cv2.INTER_AREA
    elif min_side is not None and longest < min_side:
        scale, interp = min_side / longest, cv2.INTER_CUBIC
    else:
        return (image, *masks)
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (
        cv2.resize(image, dsize, interpolation=interp),
        *(cv2.resize(m, dsize, interpolation=cv2.INTER_NEAREST) for m in masks),
    )


def _dashes(contour: np.ndarray, dash: float, gap: float) -> list[np.ndarray]:
    """The pieces of a closed contour that are "on" in a dash / gap pattern by arc length."""
    pts = contour.reshape(-1, 2)
    if len(pts) < 3:
        return [pts]
    closed = np.vstack([pts, pts[:1]])
    step = np.hypot(*np.diff(closed, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    on = (arc % (dash + gap)) < dash
    edges = np.diff(np.concatenate([[False], on, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [closed[a : b + 1] for a, b in zip(starts, ends, strict=True) if b - a >= 1]


def _draw_outline(rgb: np.ndarray, mask: np.ndarray, color, width: int, dashed: bool) -> None:
    """Outline the region of ``mask`` on its inner side: a band ``width`` px wide along its
    boundary (its holes' too, and the image edge where it touches it), a 1 px black halo on
    each side of it, nothing drawn outside the region but the outer halo. A part of the
    region thinner than the band is coloured whole."""
    m = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if dashed:
        dash = 3.0 * width + 4
        lines = [p.reshape(-1, 1, 2) for c in contours for p in _dashes(c, dash, 0.8 * dash)]
    else:
        lines = [c.reshape(-1, 1, 2) for c in contours]
    inside = m.astype(bool)
    line = np.zeros(m.shape, np.uint8)  # the contour pixels (of the dashes), 1 px wide
    cv2.polylines(line, lines, not dashed, 1, 1, cv2.LINE_8)

    def within(radius: int) -> np.ndarray:  # pixels at most ``radius`` px from the line
        kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
        return cv2.dilate(line, kernel).astype(bool)

    band = within(width - 1) & inside
    halo_in = within(width) & inside
    halo_out = within(1) & ~inside
    rgb[halo_out | halo_in] = HALO_RGB
    rgb[band] = color


def caption_lines(
    positive: bool,
    max_prob: float | None = None,
    area_px: int | None = None,
    area_cm2: float | None = None,
    side: str | None = None,
    area_doubtful: bool = False,
) -> list[str]:
    """The caption's lines: ``["no pneumothorax", "max p 0.12"]`` or
    ``["PNEUMOTHORAX, patient's right", "12.3 cm² (4,512 px), max p 0.97"]``; with
    ``area_doubtful`` (a pixel spacing too small for a chest) a third line says that the cm²
    are doubtful."""
    prob = "" if max_prob is None else f"max p {max_prob:.2f}"
    if not positive:
        return ["no pneumothorax", prob] if prob else ["no pneumothorax"]
    head = "PNEUMOTHORAX"
    if side and side in SIDE_WORDS:
        head += f", {SIDE_WORDS[side]}"
    parts = []
    if area_cm2 is not None:
        parts.append(f"{area_cm2:.1f} cm²" + (f" ({area_px:,} px)" if area_px is not None else ""))
    elif area_px is not None:
        parts.append(f"{area_px:,} px")
    if prob:
        parts.append(prob)
    lines = [head, ", ".join(parts)] if parts else [head]
    if area_doubtful and area_cm2 is not None:
        lines.append(DOUBTFUL_CM2)
    return lines


def caption_for(measures: LesionMeasures) -> list[str]:
    """:func:`caption_lines` of a prediction's :class:`~ptxseg.measures.LesionMeasures`."""
    return caption_lines(
        measures.area_px > 0, measures.max_prob, measures.area_px, measures.area_cm2,
        measures.side, measures.spacing_doubtful,
    )


def _runs(text: str) -> list[tuple[str, bool]]:
    """``text`` cut into runs of ordinary characters and of superscripts (as their digits)."""
    runs: list[tuple[str, bool]] = []
    for ch in text:
        sup = ch in SUPERSCRIPTS
        ch = SUPERSCRIPTS.get(ch, ch)
        if runs and runs[-1][1] == sup:
            runs[-1] = (runs[-1][0] + ch, sup)
        else:
            runs.append((ch, sup))
    return runs


def text_width(text: str, scale: float, thickness: int) -> int:
    """The width :func:`put_text` draws ``text`` in, superscripts included."""
    return sum(
        cv2.getTextSize(run, FONT, scale * (SUPERSCRIPT_SCALE if sup else 1.0), thickness)[0][0]
        for run, sup in _runs(text)
    )


def put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color,
             thickness: int) -> None:
    """``cv2.putText`` of ``text`` at ``org`` (its baseline's left end), each superscript
    (:data:`SUPERSCRIPTS`: ``cm²``) a smaller digit whose top is the top of the line."""
    x, y = org
    (_, cap), _ = cv2.getTextSize("M", FONT, scale, thickness)
    for run, sup in _runs(text):
        s = scale * (SUPERSCRIPT_SCALE if sup else 1.0)
        (w, h), _ = cv2.getTextSize(run, FONT, s, thickness)
        cv2.putText(img, run, (x, y - (cap - h) if sup else y), FONT, s, color, thickness,
                    cv2.LINE_AA)  # fmt: skip
        x += w


def _fit_scale(text: str, width: int, scale: float, thickness: int) -> float:
    tw = text_width(text, scale, thickness)
    return scale if tw <= width else scale * width / tw


def _caption_bar(width: int, lines: list[str], legend: bool, notice: bool = False) -> np.ndarray:
    """A dark bar ``width`` wide with the caption lines in white, with ``legend`` a key of the
    two line styles and, with ``notice``, :data:`RESEARCH_USE` in gray as its last line."""
    font = FONT
    margin = max(4, width // 60)
    thickness = 1 if width < 700 else 2
    scale = max(0.4, width / 600)  # text about 1/25 of the width high
    rows = list(lines) + (["legend"] if legend else []) + ([RESEARCH_USE] if notice else [])
    usable = width - 2 * margin
    scales = [_fit_scale(t, usable, scale, thickness) for t in lines]
    (_, th), base = cv2.getTextSize("Ag", font, scale, thickness)
    row_h = th + base + margin
    bar = np.empty((margin + row_h * len(rows), width, 3), np.uint8)
    bar[:] = BAR_RGB
    y = margin
    for i, text in enumerate(lines):
        s = scales[i] * (1.15 if i == 0 else 1.0)
        s = min(s, _fit_scale(text, usable, s, thickness))
        put_text(bar, text, (margin, y + th), s, TEXT_RGB, thickness + (1 if i == 0 else 0))
        y += row_h
    if legend:
        lw = max(2, round(width / 200))
        seg = max(16, width // 12)
        x = margin
        for label, color, dashed in (("prediction", PRED_RGB, False), ("truth", TRUTH_RGB, True)):
            yy = y + th // 2
            if dashed:  # three dashes, two gaps
                d = seg / 5
                for k in (0, 2, 4):
                    x0 = x + round(k * d)
                    cv2.line(bar, (x0, yy), (x0 + round(d) - 1, yy), color, lw)
            else:
                cv2.line(bar, (x, yy), (x + seg - 1, yy), color, lw)
            x += seg + margin
            cv2.putText(bar, label, (x, y + th), font, scale * 0.9, TEXT_RGB, thickness,
                        cv2.LINE_AA)
            (tw, _), _ = cv2.getTextSize(label, font, scale * 0.9, thickness)
            x += tw + 2 * margin
        y += row_h
    if notice:
        s = _fit_scale(RESEARCH_USE, usable, scale * 0.85, thickness)
        put_text(bar, RESEARCH_USE, (margin, y + th), s, NOTICE_RGB, thickness)
    return bar


def draw_overlay(
    image: np.ndarray,
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    *,
    style: str | OverlayStyle = OverlayStyle.FILL,
    caption: list[str] | None = None,
    max_side: int | None = None,
    legend: bool | None = None,
    min_side: int | None = None,
    notice: bool = True,
) -> np.ndarray:
    """The radiograph with the prediction (vermillion, solid, tinted when ``style`` is
    ``fill``) and the ground truth (sky blue, dashed), and a caption bar under it.

    Args:
        image: gray ``uint8`` radiograph, any size (resized to the masks' size when they
            differ).
        pred, truth: ``(H, W)`` binary masks of one size (non-zero = lesion), or None.
        style: ``fill`` or ``outline`` (:class:`OverlayStyle`).
        caption: the caption's lines (:func:`caption_lines`); None: no bar.
        max_side: shrink so that the longest side of the picture is at most this.
        min_side: enlarge so that the longest side is at least this (small images: lines and
            caption drawn at a size that stays legible).
        legend: a key of the two line styles in the caption bar (default: when ``truth`` is
            given).
        notice: end the caption with :data:`RESEARCH_USE` (a panel of a figure whose title
            says it once: ``False``).

    Shape:
        - output: ``(h + bar, w, 3)`` RGB uint8
    """
    style = OverlayStyle.parse(style, "--overlay-style")
    masks = [m for m in (pred, truth) if m is not None]
    if masks:
        shape = masks[0].shape[:2]
        if any(m.shape[:2] != shape for m in masks):
            raise ValueError("prediction and ground truth differ in shape")
        if image.shape[:2] != shape:
            image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    masks = [np.ascontiguousarray(m != 0, dtype=np.uint8) for m in masks]
    image, *masks = _fit(max_side, min_side, np.ascontiguousarray(image, dtype=np.uint8),
                         *masks)
    pred_m = masks.pop(0) if pred is not None else None
    truth_m = masks.pop(0) if truth is not None else None
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    width = line_width(rgb.shape)
    if pred_m is not None and pred_m.any():
        if style is OverlayStyle.FILL:
            tint = np.empty_like(rgb)
            tint[:] = PRED_RGB
            blended = cv2.addWeighted(rgb, 1.0 - FILL_ALPHA, tint, FILL_ALPHA, 0.0)
            cv2.copyTo(blended, pred_m, rgb)
        _draw_outline(rgb, pred_m, PRED_RGB, width, dashed=False)
    if truth_m is not None and truth_m.any():
        _draw_outline(rgb, truth_m, TRUTH_RGB, width, dashed=True)
    if caption is None:
        return rgb
    show_legend = truth is not None if legend is None else legend
    bar = _caption_bar(rgb.shape[1], caption, legend=show_legend, notice=notice)
    return np.vstack([rgb, bar])


def draw_prediction(
    image: np.ndarray,
    mask: np.ndarray,
    measures: LesionMeasures,
    *,
    style: str | OverlayStyle = OverlayStyle.FILL,
    max_side: int | None = None,
) -> np.ndarray:
    """predict's overlay of one image: :func:`draw_overlay` of the prediction alone with its
    :func:`caption_for` caption (RGB; ``cv2.cvtColor(..., cv2.COLOR_RGB2BGR)`` for
    :func:`ptxseg.fileio.write_png`)."""
    return draw_overlay(image, mask, style=style, caption=caption_for(measures),
                        max_side=max_side)
