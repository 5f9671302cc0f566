"""Synthetic chest radiographs with pneumothorax-like lesions, for the demo and the tests.

Each image is a frontal chest film drawn from simple parts, in X-ray polarity (dense = bright):

* a soft-tissue torso on a dark (air) background, with a bright abdomen below the diaphragm;
* two lungs (dark, air-filled) whose outlines vary in size and position, filled with
  "vascular markings": a network of thin bright lines (ridges of smooth random noise) that is
  strongest near the hilum and fades towards the periphery;
* mediastinum, heart, spine (with vertebrae) and clavicles (bright);
* posterior ribs: curved bright bands with brighter cortices, crossing both lungs;
* a random exposure (brightness, contrast, gamma), a little blur and film noise.

In a share of the cases one lung (random side) is partly collapsed: the lung is shrunk towards
a random anchor (hilum, base or medial edge) and the space between the collapsed lung and the
chest wall becomes a pneumothorax: a crescent along the pleural edge (apical, lateral or
both, of varied size) that is darker than the lung (pure air) and has NO vascular markings,
bounded by a thin bright visceral pleural line. Ribs still cross it, as on real films. That
crescent is the mask. The lesion is made visibly distinct on purpose so that a small U-Net
learns it within minutes on a CPU (the demo), while the image still reads as a radiograph.

The output is the ``png`` layout (``png_images/synth_NNNN.png`` + ``png_masks/...``, masks
{0, 255}); everything is deterministic in ``(seed, n, positive_fraction)``: image ``i`` is
drawn from ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ptxseg.data.records import Record
from ptxseg.errors import DataError
from ptxseg.fileio import write_png
from ptxseg.output_folder import OutputFolder, files_under
from ptxseg.progress import progress_bar

MIN_LESION_FRACTION = 0.006  # smallest lesion, as a share of the image area


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-blurred white noise; ``sigma`` in pixels."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    out = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma, 0.5))
    return (out - out.mean()) / (out.std() + 1e-6)


def _ridges(rng: np.random.Generator, size: int, sigma: float, width: float) -> np.ndarray:
    """Thin bright curvy lines in [0, 1]: where smooth noise crosses zero."""
    n = _smooth_noise(rng, size, sigma)
    return np.exp(-((n / width) ** 2))


def _ellipse(x, y, cx, cy, ax, ay) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _dome(x, side: int, base: float, height: float) -> np.ndarray:
    """Hemidiaphragm: y of the dome under one lung (highest at mid-hemithorax)."""
    return base - height * np.exp(-(((side * (x - 0.5)) - 0.2) / 0.13) ** 2)


def _lung_mask(x, y, rng, side: int, warp: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """One lung: narrow apex, round lateral edge, straight medial edge, domed base.

    ``side`` -1 = image left (patient's right lung), +1 = image right.
    """
    cx = 0.5 + side * rng.uniform(0.18, 0.21)
    cy = rng.uniform(0.42, 0.47)
    ax = rng.uniform(0.13, 0.16)
    ay = rng.uniform(0.27, 0.31)
    t = np.clip((y - (cy - ay)) / (2 * ay), 0, 1)
    ax_y = ax * (0.5 + 0.5 * t**0.3)  # narrower towards the apex
    shape = ((x - cx) / ax_y) ** 2 + ((y - cy) / (ay * 1.25)) ** 2
    lung = shape < 1.0 + 0.1 * warp
    lung &= side * (x - 0.5) > rng.uniform(0.055, 0.075)  # mediastinal edge
    lung &= y < _dome(x, side, cy + ay, rng.uniform(0.05, 0.09))
    return lung, (cx, cy, ax, ay)


def _ribs(x, y, rng, size: int) -> np.ndarray:
    """Posterior ribs: from the spine a short rise, then curving down to the chest wall."""
    out = np.zeros_like(x)
    thickness = rng.uniform(0.013, 0.018)
    start, step = rng.uniform(0.12, 0.15), rng.uniform(0.06, 0.068)
    curv = rng.uniform(1.1, 1.5)
    dx = np.abs(x - 0.5)
    fade = np.clip((dx - 0.04) / 0.04, 0, 1) * np.clip((0.47 - dx) / 0.05, 0, 1)
    for k in range(10):
        y0 = start + k * step
        d = np.abs(y - (y0 + curv * dx**2 - 0.12 * dx))
        band = np.clip(1 - d / thickness, 0, 1)
        cortex = np.exp(-(((d - thickness * 0.8) / (thickness * 0.25)) ** 2))
        out += (0.7 * band + 0.5 * cortex) * fade
    return out


def _markings(x, y, rng, size: int) -> np.ndarray:
    """Vascular markings: vessels radiating from the hila plus a fine reticular network."""
    out = np.zeros_like(x)
    for side in (-1, 1):
        hx, hy = 0.5 + side * 0.1, rng.uniform(0.44, 0.5)
        r = np.hypot(x - hx, y - hy) + 1e-3
        theta = np.arctan2(y - hy, x - hx)
        wobble = 0.35 * _smooth_noise(rng, size, size / 25)
        k = rng.integers(22, 30)
        rays = np.exp(-((np.sin(k * (theta + wobble * r) / 2) / 0.22) ** 2))
        out = np.maximum(out, rays * np.clip(1.15 - 2.2 * r, 0.25, 1.0) * (side * (x - 0.5) > 0))
    net = _ridges(rng, size, size / 50, 0.25)
    return np.clip(0.75 * out + 0.45 * net, 0, 1.2)


def _collapse(lung: np.ndarray, box: tuple[float, ...], side: int, rng, size: int) -> np.ndarray:
    """Shrink the lung towards a point of its medial edge -> the collapsed lung (bool).

    The anchor height and the two scale factors decide the crescent: apical cap (shrink in
    y only, anchored at the base), lateral strip (shrink in x only) or both (hilum/base).
    """
    cx, cy, ax, ay = box
    kind = rng.choice(["hilum", "base", "apical", "lateral"], p=[0.35, 0.25, 0.2, 0.2])
    medial_x = cx - side * ax
    anchor_y = {"hilum": cy + 0.1 * ay, "base": cy + 0.9 * ay, "apical": cy + ay,
                "lateral": cy + rng.uniform(-0.2, 0.4) * ay}[kind]
    fy = 1.0 if kind == "lateral" else rng.uniform(0.5, 0.82)
    fx = 1.0 if kind == "apical" else rng.uniform(0.45, 0.8)
    px, py = medial_x * size, anchor_y * size
    m = np.float32([[fx, 0, px * (1 - fx)], [0, fy, py * (1 - fy)]])
    shrunk = cv2.warpAffine(lung.astype(np.uint8), m, (size, size), flags=cv2.INTER_NEAREST)
    return shrunk.astype(bool) & lung


def _lesion(lung, box, side, rng, size) -> tuple[np.ndarray, np.ndarray]:
    """Pick a collapse with a large enough crescent -> (pneumothorax mask, pleural line)."""
    for _ in range(8):
        collapsed = _collapse(lung, box, side, rng, size)
        ptx = lung & ~collapsed
        if ptx.mean() >= MIN_LESION_FRACTION:
            break
    k = max(1, round(size / 256))
    edge = cv2.dilate(collapsed.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8))
    line = (edge.astype(bool) & ~collapsed & ptx).astype(np.float32)
    line = cv2.GaussianBlur(line, (0, 0), sigmaX=0.6 * k)
    return ptx, line


def draw_case(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw one radiograph and its mask.

    Shape: image (size, size) uint8; mask (size, size) uint8 in {0, 255}.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    warp = _smooth_noise(rng, size, size / 14)

    body = _ellipse(x, y, 0.5, rng.uniform(0.56, 0.62), rng.uniform(0.44, 0.5), 0.62) < 1
    img = np.where(body, 150.0, 18.0).astype(np.float32)
    img += 12 * _smooth_noise(rng, size, size / 10) * body

    lungs = []
    for side in (-1, 1):
        lung, box = _lung_mask(x, y, rng, side, warp)
        lungs.append((side, lung, box))
    base = max(b[1] + b[3] for _, _, b in lungs)
    # mediastinum + heart hide the medial lung edges
    mediastinum = (np.abs(x - 0.5) < 0.07 + 0.02 * (y > 0.5)) & (y > 0.1) & body
    heart = _ellipse(x, y, 0.5 + rng.uniform(0.03, 0.07), rng.uniform(0.64, 0.7),
                     rng.uniform(0.14, 0.18), rng.uniform(0.11, 0.14)) < 1
    dense = (mediastinum | heart) & (y < base + 0.02)
    lungs = [(side, lung & ~dense, box) for side, lung, box in lungs]
    lung_any = lungs[0][1] | lungs[1][1]
    # abdomen below the hemidiaphragms: denser
    diaphragm = (y > np.where(x < 0.5, _dome(x, -1, base, 0.07), _dome(x, 1, base, 0.06))) & body
    diaphragm &= ~lung_any
    img += 28 * diaphragm

    lung_level = rng.uniform(62, 80)
    markings = _markings(x, y, rng, size)
    lung_img = lung_level + 8 * _smooth_noise(rng, size, size / 12) + 30 * markings

    ptx = np.zeros((size, size), bool)
    line = np.zeros((size, size), np.float32)
    if positive:
        side_index = int(rng.integers(2))
        side, lung, box = lungs[side_index]
        ptx, line = _lesion(lung, box, side, rng, size)
        air = lung_level - rng.uniform(32, 42) + 3 * _smooth_noise(rng, size, size / 8)
        lung_img = np.where(ptx, air, lung_img)
        lung_img += rng.uniform(55, 70) * line

    img = np.where(lung_any, lung_img, img)

    img = np.where(dense, 185 + 6 * _smooth_noise(rng, size, size / 16), img)
    spine = np.abs(x - 0.5) < 0.035
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * y / rng.uniform(0.055, 0.065))
    img += spine * body * (18 + 10 * vertebrae)

    # ribs and clavicles (bone adds density everywhere it crosses)
    img += rng.uniform(26, 34) * _ribs(x, y, rng, size) * body * np.where(dense, 0.4, 1.0)
    for side in (-1, 1):
        clav_y = 0.15 + 0.12 * (np.abs(x - 0.5) - 0.1) ** 2 + rng.uniform(-0.01, 0.01)
        clav = (np.abs(y - clav_y) < 0.012) & (np.abs(x - 0.5) > 0.05)
        clav &= side * (x - 0.5) > 0
        clav &= np.abs(x - 0.5) < 0.34
        img += 35 * clav

    # exposure, blur, film noise
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.6, size / 420))
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    img = 255 * (np.clip(img, 0, 255) / 255) ** rng.uniform(0.85, 1.15)
    img += rng.normal(0, rng.uniform(2.5, 4.5), img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, ptx.astype(np.uint8) * 255


def generate(
    out: str | Path,
    n: int = 200,
    size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.5,
    *,
    overwrite: bool = False,
    progress: bool = False,
    prefix: str = "synth",
    announce: Callable[[str], None] | None = None,
) -> list[Record]:
    """Write a synthetic dataset in the png layout and return its records (sorted by id),
    under the one output-folder rule (:class:`ptxseg.output_folder.OutputFolder`): a
    previous synth's dataset in ``out`` is replaced (none of its images stays beside the new
    ones), anything else in ``out`` needs ``overwrite``.

    Args:
        out: output folder; absent, empty, or a previous synth's, unless ``overwrite``.
        n: number of images.
        size: image side in pixels.
        seed: everything is deterministic in (seed, n, positive_fraction).
        positive_fraction: share of images with a pneumothorax (exactly
            ``round(n * positive_fraction)`` of them).
        overwrite: allow writing into a folder that holds other files (files of the same
            name are replaced, the others kept).
        progress: show a progress bar.
        prefix: ids are ``{prefix}_0000``...; give a held-out set its own prefix, since runs
            and evaluations match images by id.
        announce: called with the line that says what of a previous synth was replaced.
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 32 <= size <= 4096:
        raise ValueError(f"size must be in 32..4096, got {size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    n_pos = round(n * positive_fraction)
    positives = set(np.random.default_rng([seed, n]).permutation(n)[:n_pos].tolist())
    width = max(4, len(str(n - 1)))
    names = [f"{prefix}_{i:0{width}d}" for i in range(n)]
    files = [out / sub / f"{name}.png" for name in names for sub in ("png_images", "png_masks")]
    folder = OutputFolder(out, "synth", overwrite=overwrite, option="OUT")
    folder.check(files)
    mine = folder.recorded() or set()
    others = sorted(p for p in files_under(out) if p not in mine and p != folder.lock_path)
    if others and not overwrite:  # a dataset folder: any other file would join the dataset
        raise DataError(
            out, f"folder is not empty and not a previous ptxseg synth's (e.g. {others[0]}); "
            "refusing to mix datasets (--overwrite to write into it anyway)"
        )
    records = []
    with folder.hold(files), progress_bar(enabled=progress) as bar:
        folder.start(files, {"n": n, "size": size, "seed": seed, "prefix": prefix,
                             "positive_fraction": positive_fraction})  # fmt: skip
        task = bar.add_task("synth", total=n)
        for i, name in enumerate(names):
            image, mask = draw_case(np.random.default_rng([seed, i]), size, i in positives)
            img_path = out / "png_images" / f"{name}.png"
            mask_path = out / "png_masks" / f"{name}.png"
            write_png(img_path, image)
            write_png(mask_path, mask)
            records.append(Record(name, img_path, mask_path, bool(mask.any()), None))
            bar.advance(task)
        change = folder.finish()
    if change is not None and announce is not None:
        announce(change)
    return records
