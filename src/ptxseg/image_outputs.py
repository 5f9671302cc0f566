"""The files one predicted image gives: ``masks/<id>.png`` ({0, 255}, native size),
``overlays/<id>.png`` (:func:`ptxseg.overlays.draw_prediction`: the radiograph with the
predicted region in the ``--overlay-style``, and a caption with the finding, longest side
capped at :data:`OVERLAY_MAX_SIDE`), with ``--dicom-seg`` a DICOM Segmentation
``dicom_seg/<id>.dcm`` for a DICOM input (:mod:`ptxseg.dicomseg`), its ``results.csv`` row
(:data:`RESULTS_COLUMNS`: the lesion measures of :mod:`ptxseg.measures`) and, for a
submission, its Kaggle row (``-1`` for an empty mask).

The mask is the one :func:`ptxseg.postprocess.binarize` of tune and evaluate, applied to the
probabilities resized back to the image's native size, with areas scaled by
:func:`ptxseg.postprocess.area_scale`; ``max_prob`` is taken at model resolution, as in
evaluate's ``per_image.csv``. A DICOM's header comes with its pixels (``Item.header``), so the
measures and the SEG read no file again.

``dicom_seg`` / ``dicom_seg_note``: the SEG's path relative to ``--out``, or empty with the
reason in the note (an input that is not a DICOM). A DICOM from which no SEG can be made
(multi-frame, header without the UIDs a SEG references) keeps its mask, measures and overlay;
its status is ``error: DICOM SEG not written: <reason>`` and it counts as a failed file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ptxseg.data.resize import probs_to_native
from ptxseg.data.rle import encode
from ptxseg.dicomseg import AlgorithmInfo
from ptxseg.errors import DataError, PtxsegError, printable
from ptxseg.fileio import sha256_file, write_png
from ptxseg.kaggle import kaggle_image_id
from ptxseg.measures import MEASURE_COLUMNS, LesionMeasures, measure, read_geometry
from ptxseg.overlays import OverlayStyle, draw_prediction
from ptxseg.postprocess import PostParams, area_scale, binarize

if TYPE_CHECKING:
    from ptxseg.data.dataset import Item

MASKS = "masks"
OVERLAYS = "overlays"
DICOM_SEG = "dicom_seg"
DICOM_SEG_SUFFIX = ".dcm"
RESULTS_COLUMNS = (
    "id",
    "source",
    "height",
    "width",
    "has_pneumothorax",
    "area_fraction",
    *MEASURE_COLUMNS,  # area_px, area_cm2, area_note, side, right_share, side_basis, max_prob
    "dicom_seg",
    "dicom_seg_note",
    "status",
)
OVERLAY_MAX_SIDE = 1024  # overlays are for looking at; masks keep the full native size
NOT_DICOM = "not a DICOM input: no DICOM SEG"


def seg_algorithm(run_name: str, model_files: Sequence[Path | None], tta: str,
                  params: PostParams) -> AlgorithmInfo:
    """What identifies the model in every SEG of one predict (computed once per run): the run
    folder's name, the SHA-256 of the checkpoint (torch) or ONNX file (onnx) the predictor
    loaded (of an ensemble: the SHA-256 of its members' hex digests, one per line, in order),
    the TTA and the post-processing rule."""
    digests = [sha256_file(p) for p in model_files if p is not None]
    if len(digests) > 1:
        import hashlib

        sha = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    else:
        sha = digests[0] if digests else None
    parameters = {"tta": str(tta), **{k: f"{v:g}" if isinstance(v, float) else str(v)
                                      for k, v in params.to_dict().items()}}
    if len(digests) > 1:
        parameters["ensemble_members"] = str(len(digests))
    return AlgorithmInfo(run=run_name, checkpoint_sha256=sha, parameters=parameters)


@dataclass
class ImageResult:
    """One row of results.csv (and of the Kaggle CSV when ``rle`` is set); ``measures`` is
    None for an image that could not be predicted."""

    id: str
    source: str
    height: int = 0
    width: int = 0
    measures: LesionMeasures | None = None
    dicom_seg: str = ""
    dicom_seg_note: str = ""
    status: str = "ok"
    kaggle_id: str | None = None
    rle: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def predicted(self) -> bool:
        """A mask was written (even when the row's status is an error of its DICOM SEG)."""
        return self.measures is not None

    @property
    def has_pneumothorax(self) -> bool:
        return self.measures is not None and self.measures.area_px > 0

    @property
    def area_px(self) -> int | None:
        return None if self.measures is None else self.measures.area_px

    @property
    def max_prob(self) -> float | None:
        return None if self.measures is None else self.measures.max_prob

    @property
    def reason(self) -> str:
        return self.status.removeprefix("error: ")

    def row(self) -> list[str]:
        m = self.measures
        if m is None:
            return [self.id, printable(self.source), *[""] * (len(RESULTS_COLUMNS) - 3),
                    printable(self.status)]
        return [
            self.id,
            printable(self.source),
            str(self.height),
            str(self.width),
            str(int(m.area_px > 0)),
            f"{m.area_px / float(self.height * self.width):.6f}",
            *(printable(cell) for cell in m.row()),
            self.dicom_seg,
            printable(self.dicom_seg_note),
            printable(self.status),
        ]


@dataclass(frozen=True)
class Post:
    """What :func:`finish` writes for each image: the rule, ``out``, overlays (and their
    style), a Kaggle row, and a DICOM SEG (``seg``: the algorithm of each SEG, or None)."""

    params: PostParams
    out: Path
    overlays: bool
    kaggle: bool
    kaggle_ids: dict[str, str] = field(default_factory=dict)  # id -> ImageId (--id-map)
    style: OverlayStyle = OverlayStyle.FILL
    seg: AlgorithmInfo | None = None


def _write(fn, path: Path, *args, **kwargs) -> None:
    try:
        fn(path, *args, **kwargs)
    except OSError as exc:
        raise PtxsegError(f"{path}: cannot write ({exc.strerror or exc})") from None


def seg_path(out: Path, ident: str) -> Path:
    """Where the DICOM SEG of image ``ident`` goes."""
    return out / DICOM_SEG / f"{ident}{DICOM_SEG_SUFFIX}"


def native_mask(probs: np.ndarray, height: int, width: int, params: PostParams) -> np.ndarray:
    """predict's mask of one image: the model-resolution ``probs`` back at the image's
    native ``(height, width)`` (bilinear), then the one :func:`binarize` with the rule's areas
    scaled to that size. ``ptxseg serve`` calls it too, so both give the same masks.

    Shape:
        - probs: ``(S, S)`` float32; output: ``(height, width)`` uint8 in {0, 1}
    """
    native = probs_to_native(probs, height, width)
    return binarize(native, params, area_scale=area_scale(params, height, width))


def finish(item: Item, probs: np.ndarray, post: Post) -> ImageResult:
    """Native-size post-processing and the per-image files of one prediction (thread pool).
    A DICOM header with a corrupt value makes the image a failed one (nothing written)."""
    from ptxseg.dicomseg import write_dicom_seg

    h, w = item.height, item.width
    try:
        geometry = read_geometry(item.path, item.header)
    except DataError as exc:
        return ImageResult(item.id, item.path, status=f"error: {error_reason(item, exc)}")
    mask = native_mask(probs, h, w, post.params)
    # at model resolution, as evaluate's per_image.csv
    measures = measure(mask, geometry, max_prob=float(probs.max()))
    _write(write_png, post.out / MASKS / f"{item.id}.png", mask * np.uint8(255))
    if post.overlays:
        overlay = draw_prediction(item.image, mask, measures, style=post.style,
                                  max_side=OVERLAY_MAX_SIDE)
        _write(write_png, post.out / OVERLAYS / f"{item.id}.png",
               cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), fast=True)
    result = ImageResult(id=item.id, source=item.path, height=h, width=w, measures=measures)
    if post.seg is not None:
        if item.header is None:
            result.dicom_seg_note = NOT_DICOM
        else:
            path = seg_path(post.out, item.id)
            try:
                write_dicom_seg(item.header, mask, path, post.seg, name=item.path)
                result.dicom_seg = path.relative_to(post.out).as_posix()
            except OSError as exc:
                raise PtxsegError(f"{path}: cannot write ({exc.strerror or exc})") from None
            except DataError as exc:
                reason = error_reason(item, exc)
                result.dicom_seg_note = reason
                result.status = f"error: DICOM SEG not written: {reason}"
    if post.kaggle:
        fallback = post.kaggle_ids.get(item.id, item.id)
        result.kaggle_id = kaggle_image_id(Path(item.path), fallback)
        result.rle = encode(mask)
    return result


def error_reason(item: Item, error: Exception | None = None) -> str:
    """Why ``item`` failed (its read error, or ``error``), without the leading file name
    (results.csv names the file in its ``source`` column)."""
    message = str(error) if error is not None else (item.error or "cannot read image")
    prefix = f"{item.path}: "
    return message.removeprefix(prefix)
