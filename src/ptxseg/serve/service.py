"""The model side of ``ptxseg serve``: one loaded model and what one request goes through.

A :class:`Service` holds the run's :class:`~ptxseg.predictor.Predictor` (loaded once, with the
run's thresholds rule and the test-time augmentation it was tuned with), the
:class:`~ptxseg.serve.batcher.MicroBatcher` whose worker thread owns it, and a small thread
pool for the work around the model. One request goes:

1. :meth:`Service.receive`: the body, read while the request holds one of ``max_uploads``
   upload places (one more is refused at once, :class:`Busy`), under the size limit and
   complete within ``body_timeout_s`` (:func:`~ptxseg.serve.upload.read_body`): a client that
   sends a few bytes and idles holds an upload place for that long at most, never a queue
   place;
2. :meth:`Service.admitted`: once the body is read, at most ``queue`` requests are in the
   service at once (taking the image out of the body, decoding, waiting, on the model,
   encoding); one more is refused at once (:class:`Busy`: 503 with ``Retry-After``). With the
   body limit, the two bound the memory;
3. :meth:`Service.decode` (pool): the bytes read by :func:`ptxseg.data.imageio.read_image_bytes`,
   the decoders of ``ptxseg predict``, then :func:`ptxseg.data.resize.resize_to` the model
   size, as predict's reading workers do;
4. the batcher: a micro-batch through :meth:`~ptxseg.predictor.Predictor.batch_probs` (a
   worker that has stopped is refused at once, :class:`Unavailable`: 503);
5. :meth:`Service.result` (pool): :func:`ptxseg.image_outputs.native_mask`, predict's
   resize-back and binarize (so the masks are predict's), the lesion measures
   (:mod:`ptxseg.measures`), and the PNGs (mask, overlay by :mod:`ptxseg.overlays`, a
   reduced probability map and preview for the page's slider), or a DICOM SEG
   (:mod:`ptxseg.dicomseg`).

Nothing is written to disk, and no request names a file: uploads are bytes in memory. The
answer is JSON that any parser reads (:func:`finite_json`: a number that is not finite
becomes ``null``, the reason in ``not_finite``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
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
from ptxseg.serve.batcher import MicroBatcher, QueueFull, WorkerDead
from ptxseg.tta import Tta

DEFAULT_MAX_BODY_MB = 50.0  # a 4k x 4k 16-bit uncompressed DICOM is 32 MB
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_BODY_TIMEOUT_S = 60.0  # 50 MB at 1 MB/s, with room
MIN_QUEUE = 16
UPLOADS_PER_QUEUE_PLACE = 4
MAP_MAX_SIDE = 256  # the probability map the page's slider redraws from
PREVIEW_MAX_SIDE = 512  # the gray radiograph under it
RETRY_AFTER_S = 1


class Busy(Exception):
    """The service holds as many requests as its queue allows."""


class NotDicom(Exception):
    """A DICOM SEG was asked for an upload that is not a DICOM."""


class Unavailable(Exception):
    """The model worker has stopped: no request can be answered (503, no retry)."""


#: the numeric limits: name -> (smallest, largest, unit); every value must be finite
RANGES = {
    "max_batch": (1, 1024, "images"),
    "batch_wait_ms": (0.0, 10_000.0, "ms"),
    "queue": (1, 100_000, "requests"),
    "max_body_mb": (0.001, 2_000.0, "MB"),
    "body_timeout_s": (0.1, 3_600.0, "s"),
    "max_uploads": (1, 100_000, "requests"),
    "workers": (1, 256, "threads"),
}
OPTIONAL = ("max_batch", "queue", "max_uploads", "workers")  # None: the default rule


@dataclass(frozen=True)
class Limits:
    """How much the service takes on (``None``: the default rule); each value is checked
    against :data:`RANGES` (finite, in range: a :class:`ConfigError` naming the option).

    Args:
        max_batch: the most images per forward pass (default: the predictor's batch size,
            :func:`ptxseg.hardware.inference_batch_size`: 4 on a CPU, 32 on a GPU).
        batch_wait_ms: how long a batch's first image waits for others.
        queue: the most requests in the service at once, their bodies read (default:
            ``max(16, 2 * max_batch)``); one more is answered 503.
        max_body_mb: the largest request body (MB, 10^6 bytes); a larger one is answered 413.
        body_timeout_s: the time a request's body has to arrive whole; later: 408.
        max_uploads: the most bodies being read at once (default: 4 x ``queue``); one more is
            answered 503.
        workers: threads decoding uploads and encoding answers (default: cores, at most 4).
    """

    max_batch: int | None = None
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    queue: int | None = None
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_uploads: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        for name, (low, high, unit) in RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                check_range(f"--{name.replace('_', '-')}", value, low, high, unit)


def check_range(option: str, value: Any, low: float, high: float, unit: str) -> None:
    """Refuse a value that is not a finite number from ``low`` to ``high`` (a whole number
    where ``low`` is an int): one :class:`ConfigError` line naming ``option``."""
    whole = isinstance(low, int)
    if isinstance(value, bool):
        number = False
    elif whole:
        number = isinstance(value, int)
    else:
        number = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if not (number and low <= value <= high):
        got = repr(value)
        got = got if len(got) <= 40 else got[:40] + "..."
        kind = "a whole number" if whole else "a finite number"
        unit = f" {unit}" if unit else ""
        raise ConfigError(f"{option}: must be {kind} from {low:g} to {high:g}{unit} (got {got})")


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
        self.body_timeout = float(limits.body_timeout_s)
        self.max_uploads = limits.max_uploads or UPLOADS_PER_QUEUE_PLACE * self.queue
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
        self.uploading = 0
        self.refused_uploads = 0
        self.slow_bodies = 0
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

    def run(self, fn, *args):
        """``fn(*args)`` on the pool (off the event loop), in the request's logging context
        (:func:`ptxseg.serve.logs.in_request_context`); an awaitable."""
        from ptxseg.serve.logs import in_request_context

        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.pool, in_request_context(fn, *args))

    # -- admission -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raises :class:`Unavailable` when the model worker has stopped (a request is then
        refused before its body is read)."""
        if self.batcher.failure is not None:
            raise Unavailable(f"the model worker has stopped ({self.batcher.failure}): the "
                              "service cannot answer; restart it")  # fmt: skip

    async def receive(self, request) -> bytes:
        """The body of ``request``, read while it holds one of ``max_uploads`` upload places,
        under the size limit and within ``body_timeout`` seconds
        (:func:`ptxseg.serve.upload.read_body`).

        Raises:
            Busy: every upload place is taken.
            BodyTooLarge, BodyTimeout, BadUpload, ClientGone: see ``read_body``.
        """
        from ptxseg.serve.upload import BodyTimeout, read_body

        with self._lock:
            if self.uploading >= self.max_uploads:
                self.refused_uploads += 1
                raise Busy(
                    f"busy: {self.uploading} uploads being received (--max-uploads "
                    f"{self.max_uploads}); retry after {RETRY_AFTER_S} s"
                )
            self.uploading += 1
        try:
            return await read_body(request, self.max_body, self.body_timeout)
        except BodyTimeout:
            with self._lock:
                self.slow_bodies += 1
            raise
        finally:
            with self._lock:
                self.uploading -= 1

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
            Unavailable: the model worker has stopped.
        """
        try:
            return await self.batcher.infer(upload.x)
        except QueueFull as exc:
            raise Busy(f"busy: {exc}; retry after {RETRY_AFTER_S} s") from None
        except WorkerDead as exc:
            raise Unavailable(f"{exc}: the service cannot answer; restart it") from None

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
        """What ``GET /v1/model`` says: the run, the model (an ensemble's members and how they
        combine), the rule, TTA, backend, device, version and the service's limits."""
        from ptxseg import __version__
        from ptxseg.data.imageio import max_pixels

        members = self.predictor.members
        source = self.rule.source
        return {
            "run": self.run_name,
            "architecture": _joined(m.arch for m in members),
            "encoder": _joined(m.encoder for m in members),
            "input_size": self.predictor.size,
            "ensemble_size": len(members),
            "combine": self.predictor.record()["combine"],
            "members": [_member_name(m) for m in members],
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
            "max_uploads": self.max_uploads,
            "body_timeout_s": self.body_timeout,
        }

    def describe(self) -> str:
        """The model in words, for the command's first line: ``unet/efficientnet-b0, 64 px``
        or ``a 5-member ensemble (mean probability) of unet/efficientnet-b0, 64 px``."""
        info = self.model_info()
        model = f"{info['architecture']}/{info['encoder']}, {info['input_size']} px"
        n = info["ensemble_size"]
        return model if n == 1 else f"a {n}-member ensemble ({info['combine']}) of {model}"

    def health(self) -> dict[str, Any]:
        """What ``GET /healthz`` says: ``status`` ``ok``, or ``dead`` with ``worker`` saying
        why the model worker stopped; the load and what was refused."""
        failure = self.batcher.failure
        with self._lock:
            return {
                "status": "ok" if failure is None else "dead",
                "worker": "running" if failure is None else f"stopped ({failure})",
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "queue": self.queue,
                "uploading": self.uploading,
                "max_uploads": self.max_uploads,
                "waiting_for_model": self.batcher.waiting,
                "answered": self.answered,
                "refused_busy": self.refused,
                "refused_uploads": self.refused_uploads,
                "slow_bodies": self.slow_bodies,
                "batches": {str(k): v for k, v in sorted(self.batcher.batch_sizes.items())},
                "time": time.time(),
            }


def _joined(values) -> str:
    """Distinct values in order, joined with `` + `` (an ensemble of mixed members)."""
    return " + ".join(dict.fromkeys(str(v) for v in values))


def _member_name(member) -> str:
    """A member as ``/v1/model`` names it: its run folder's and file's names (``fold-0/
    best.ckpt``), never a full path of the server."""
    if member.path is None:
        return member.description
    path = Path(member.path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def finite_json(answer: Any) -> Any:
    """``answer`` (JSON-like: dicts, lists, numbers, text) with every number that is not
    finite (NaN, +-inf: JSON has no spelling for them) replaced by ``null``; a dict that held
    one gets ``not_finite``: ``{key: "inf"}`` for each (the reason the value is empty)."""
    if isinstance(answer, (float, np.floating)):
        return float(answer) if math.isfinite(answer) else None
    if isinstance(answer, (list, tuple)):
        return [finite_json(v) for v in answer]
    if not isinstance(answer, dict):
        return answer
    out, reasons = {}, {}
    for key, value in answer.items():
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            reasons[key] = repr(float(value))
        out[key] = finite_json(value)
    if reasons:
        out["not_finite"] = {**out.get("not_finite", {}), **reasons}
    return out
