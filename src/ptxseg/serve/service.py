"""The model side of ``ptxseg serve``: one loaded model and what one request goes through.

A :class:`Service` holds the run's :class:`~ptxseg.predictor.Predictor` (loaded once, with the
run's thresholds rule and the test-time augmentation it was tuned with), the
:class:`~ptxseg.serve.batcher.MicroBatcher` whose worker thread owns it, and a small thread
pool for the work around the model. One request goes:

1. :meth:`Service.admitted`: at most ``queue`` requests are in the service at once (reading,
   decoding, waiting, on the model, encoding); one more is refused at once
   (:class:`Busy`: 503 with ``Retry-After``). With the body limit, this bounds the memory.
2. :meth:`Service.decode` (pool): the bytes read by :func:`ptxseg.data.imageio.read_image_bytes`,
   the decoders of ``ptxseg predict``, then :func:`ptxseg.data.resize.resize_to` the model
   size, as predict's reading workers do;
3. the batcher: a micro-batch through :meth:`~ptxseg.predictor.Predictor.batch_probs`;
4. :meth:`Service.result` (pool): :func:`ptxseg.image_outputs.native_mask`, predict's
   resize-back and binarize (so the masks are predict's), the lesion measures
   (:mod:`ptxseg.measures`), and the PNGs (mask, overlay by :mod:`ptxseg.overlays`, a
   reduced probability map and preview for the page's slider), or a DICOM SEG
   (:mod:`ptxseg.dicomseg`).

Nothing is written to disk, and no request names a file: uploads are bytes in memory.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptxseg import hardware
from ptxseg.errors import ConfigError, DataError
from ptxseg.fileio import read_json
from ptxseg.run import Run, Thresholds
from ptxseg.serve.batcher import MicroBatcher, QueueFull
from ptxseg.tta import Tta

DEFAULT_MAX_BODY_MB = 50.0  # a 4k x 4k 16-bit uncompressed DICOM is 32 MB
DEFAULT_BATCH_WAIT_MS = 5.0
MIN_QUEUE = 16
MAP_MAX_SIDE = 256  # the probability map the page's slider redraws from
PREVIEW_MAX_SIDE = 512  # the gray radiograph under it
RETRY_AFTER_S = 1


class Busy(Exception):
    """The service holds as many requests as its queue allows."""


class NotDicom(Exception):
    """A DICOM SEG was asked for an upload that is not a DICOM."""


@dataclass(frozen=True)
class Limits:
    """How much the service takes on (``None``: the default rule).

    Args:
        max_batch: the most images per forward pass (default: the predictor's batch size,
            :func:`ptxseg.hardware.inference_batch_size`: 4 on a CPU, 32 on a GPU).
        batch_wait_ms: how long a batch's first image waits for others.
        queue: the most requests in the service at once (default: ``max(16, 2 * max_batch)``);
            one more is answered 503.
        max_body_mb: the largest request body (MB, 10^6 bytes); a larger one is answered 413.
        workers: threads decoding uploads and encoding answers (default: cores, at most 4).
    """

    max_batch: int | None = None
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    queue: int | None = None
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1 (got {value})")
        if not self.batch_wait_ms >= 0:
            raise ConfigError(f"--batch-wait-ms: must be >= 0 (got {self.batch_wait_ms})")
        if not self.max_body_mb > 0:
            raise ConfigError(f"--max-body-mb: must be > 0 (got {self.max_body_mb})")


@dataclass
class Upload:
    """One decoded upload: its name (the client's file name or ``upload``), format, native
    gray image, DICOM dataset (``None`` for PNG/JPEG...) and model-size input ``(1, S, S)``."""

    name: str
    format: str
    image: np.ndarray
    dataset: Any
    x: np.ndarray


def b64png(array: np.ndarray, *, fast: bool = False) -> str:
    """An array as base64 PNG text (uint8 (H, W) gray or (H, W, 3) BGR)."""
    from ptxseg.fileio import encode_png

    return base64.b64encode(encode_png(array, fast=fast)).decode("ascii")


def reduced_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(height, width)`` scaled so that the longest side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def tuned_tta(rule: Thresholds) -> Tta:
    """The test-time augmentation a thresholds file was tuned with (``ptxseg tune`` records
    it as ``"tta"``); ``none`` for the default rule or a file that does not say."""
    if rule.path is None:
        return Tta.NONE
    try:
        value = read_json(rule.path, "thresholds file").get("tta", Tta.NONE)
    except (DataError, AttributeError):
        return Tta.NONE  # the rule itself was read: load_params raised on anything worse
    return Tta.parse(value, f"{rule.path}: 'tta'")


class Service:
    """A loaded model served to concurrent requests (see the module doc). Use
    :meth:`from_run`, then :meth:`start` / :meth:`close` (the app's lifespan does)."""

    def __init__(self, predictor, rule: Thresholds, *, run_name: str, backend: str = "torch",
                 limits: Limits = Limits()):  # fmt: skip
        self.predictor = predictor
        self.backend = str(backend)
        self.rule = rule
        self.run_name = run_name
        self.limits = limits
        self.max_batch = limits.max_batch or predictor.batch_size
        self.queue = limits.queue or max(MIN_QUEUE, 2 * self.max_batch)
        self.max_body = int(limits.max_body_mb * 1_000_000)
        self.workers = limits.workers or min(4, hardware.cores())
        self.batcher = MicroBatcher(
            predictor.batch_probs,
            max_batch=self.max_batch,
            max_wait_s=limits.batch_wait_ms / 1000.0,
            capacity=self.queue,
        )
        self.in_flight = 0
        self.peak_in_flight = 0
        self.answered = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._algorithm = None
        self._algorithm_lock = threading.Lock()

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        *,
        thresholds: str | Path | None = None,
        tta: str | Tta | None = None,
        backend: str = "torch",
        model: str | Path | None = None,
        device: str = "auto",
        limits: Limits = Limits(),
    ) -> Service:
        """Load the model of ``run`` once (:meth:`ptxseg.predictor.Predictor.from_run`) with
        the run's thresholds rule (:meth:`ptxseg.run.Run.thresholds`: ``thresholds``, else
        the tuned ``thresholds.json``, else the default rule with a warning) and ``tta``
        (default: the one the thresholds were tuned with, else none).

        Raises:
            PtxsegError: a missing run folder, an unusable checkpoint, model or thresholds file.
        """
        from ptxseg.postprocess import with_model_size
        from ptxseg.predictor import Backend, Predictor

        run = Run.open(run)
        rule = run.thresholds(thresholds)
        chosen = Tta.parse(tta, "--tta") if tta is not None else tuned_tta(rule)
        predictor = Predictor.from_run(
            run, backend=backend, model=model, device=device, tta=chosen,
            batch_size=limits.max_batch, compile=False,
        )  # fmt: skip
        rule = Thresholds(with_model_size(rule.params, predictor.size), rule.path)
        return cls(predictor, rule, run_name=run.path.resolve().name,
                   backend=Backend.parse(backend, "--backend"), limits=limits)  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ptxseg-serve")
        self.batcher.start()

    def close(self) -> None:
        self.batcher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("the service is not started")
        return self._pool

    # -- admission -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``queue`` places for a request.

        Raises:
            Busy: every place is taken.
        """
        with self._lock:
            if self.in_flight >= self.queue:
                self.refused += 1
                raise Busy(
                    f"busy: {self.in_flight} requests in the service (--queue {self.queue}); "
                    f"retry after {RETRY_AFTER_S} s"
                )
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.answered += 1

    # -- the stages of a request ---------------------------------------------------------------

    def decode(self, data: bytes, name: str = "upload") -> Upload:
        """Read an upload as predict reads a file, and bring it to the model size.

        Raises:
            DataError: not an image, truncated, corrupt (:class:`UnsupportedImage`: an image
                that reads but cannot be used).
        """
        from ptxseg.data.imageio import read_image_bytes
        from ptxseg.data.resize import resize_to

        decoded = read_image_bytes(data, name)
        x = resize_to(decoded.image, self.predictor.size)[None]
        return Upload(name, decoded.format, decoded.image, decoded.dataset, x)

    async def infer(self, upload: Upload) -> np.ndarray:
        """The ``(S, S)`` probabilities of an upload, from a micro-batch.

        Raises:
            Busy: the batcher's queue is full (cannot happen while admission holds).
        """
        try:
            return await self.batcher.infer(upload.x)
        except QueueFull as exc:
            raise Busy(f"busy: {exc}; retry after {RETRY_AFTER_S} s") from None

    def mask(self, upload: Upload, probs: np.ndarray) -> np.ndarray:
        """The native-size mask of ``ptxseg predict`` (:func:`ptxseg.image_outputs.native_mask`)."""
        from ptxseg.image_outputs import native_mask

        h, w = upload.image.shape[:2]
        return native_mask(probs, h, w, self.rule.params)

    def geometry(self, upload: Upload):
        """The :class:`~ptxseg.measures.Geometry` of an upload (pixel spacing and orientation
        from a DICOM header; none for other formats)."""
        from ptxseg.data.imageio import _dicom_errors
        from ptxseg.measures import Geometry, geometry_from_dataset

        if upload.dataset is None:
            return Geometry(spacing_note=f"no pixel spacing ({upload.format} image, not DICOM)")
        with _dicom_errors(upload.name):
            return geometry_from_dataset(upload.dataset)

    def result(self, upload: Upload, probs: np.ndarray, *, images: bool = True) -> dict[str, Any]:
        """The JSON answer of one upload (see :class:`ptxseg.serve.app.Prediction`)."""
        import cv2

        from ptxseg.data.resize import probs_to_native
        from ptxseg.data.rle import encode
        from ptxseg.image_outputs import OVERLAY_MAX_SIDE
        from ptxseg.measures import measure
        from ptxseg.overlays import draw_prediction

        mask = self.mask(upload, probs)
        h, w = mask.shape
        measures = measure(mask, self.geometry(upload), max_prob=float(probs.max()))
        out: dict[str, Any] = {
            "format": upload.format,
            "width": w,
            "height": h,
            "has_pneumothorax": measures.area_px > 0,
            "area_fraction": measures.area_px / float(h * w),
            **measures.to_dict(),  # the measures of results.csv, by the same names
            "rle": encode(mask),
            "thresholds": self.rule.params.to_dict(),
        }
        if not images:
            return out
        overlay = draw_prediction(upload.image, mask, measures, max_side=OVERLAY_MAX_SIDE)
        mh, mw = reduced_shape(h, w, MAP_MAX_SIDE)
        small = probs_to_native(probs, mh, mw)
        ph, pw = reduced_shape(h, w, PREVIEW_MAX_SIDE)
        preview = cv2.resize(upload.image, (pw, ph), interpolation=cv2.INTER_AREA)
        out.update(
            mask_png=b64png(mask * np.uint8(255)),
            overlay_png=b64png(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), fast=True),
            probability_map={
                "width": mw,
                "height": mh,
                "png": b64png(np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)),
            },
            preview_png=b64png(preview, fast=True),
        )
        return out

    @property
    def algorithm(self):
        """What identifies the model in a DICOM SEG: predict's own record of it
        (:func:`ptxseg.image_outputs.seg_algorithm`: run name, the members' SHA-256, TTA and
        rule), computed once, at the first SEG asked for."""
        with self._algorithm_lock:
            if self._algorithm is None:
                from ptxseg.image_outputs import seg_algorithm

                self._algorithm = seg_algorithm(
                    self.run_name, [m.path for m in self.predictor.members],
                    self.predictor.tta, self.rule.params,
                )  # fmt: skip
        return self._algorithm

    def dicom_seg(self, upload: Upload, probs: np.ndarray) -> bytes:
        """The DICOM SEG (:func:`ptxseg.dicomseg.build_segmentation`) of the predicted mask
        over a DICOM upload.

        Raises:
            NotDicom: the upload is not a DICOM.
            DataError: a source no SEG can be made from (multi-frame, missing UIDs...).
        """
        from ptxseg.data.imageio import UnsupportedImage
        from ptxseg.dicomseg import build_segmentation

        if upload.dataset is None:
            raise NotDicom(
                f"format=dicom-seg needs a DICOM upload (got a {upload.format} image)"
            )
        try:
            seg = build_segmentation(upload.dataset, self.mask(upload, probs), self.algorithm,
                                     name=upload.name)  # fmt: skip
            buf = io.BytesIO()
            seg.save_as(buf, enforce_file_format=True)
        except DataError as exc:  # multi-frame, missing UIDs ...: the upload, not the service
            raise UnsupportedImage(exc.path, exc.problem) from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on odd headers
            raise UnsupportedImage(upload.name, f"cannot write a DICOM SEG of it ({exc})") from None
        return buf.getvalue()

    # -- what the service says of itself -------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        from ptxseg import __version__
        from ptxseg.data.imageio import max_pixels

        member = self.predictor.members[0]
        source = self.rule.source
        return {
            "run": self.run_name,
            "architecture": member.arch,
            "encoder": member.encoder,
            "input_size": self.predictor.size,
            "thresholds": self.rule.params.to_dict(),
            "thresholds_source": source if self.rule.path is None else self.rule.path.name,
            "thresholds_rule": self.rule.params.describe(),
            "tta": str(self.predictor.tta),
            "backend": self.backend,
            "device": self.predictor.device,
            "version": __version__,
            "max_batch": self.max_batch,
            "queue": self.queue,
            "max_body_bytes": self.max_body,
            "max_pixels": max_pixels(),
        }

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": "ok",
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "queue": self.queue,
                "waiting_for_model": self.batcher.waiting,
                "answered": self.answered,
                "refused_busy": self.refused,
                "batches": {str(k): v for k, v in sorted(self.batcher.batch_sizes.items())},
                "time": time.time(),
            }

