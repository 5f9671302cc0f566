"""Micro-batching: requests that arrive together share one forward pass.

One worker thread owns the model. It takes the first waiting image, then gathers more for at
most ``max_wait_s`` (a few milliseconds) or until it holds ``max_batch`` images, runs them as
one batch and hands each request its own probabilities. The queue in front of it is bounded
(``capacity``): :meth:`MicroBatcher.submit` on a full queue raises :class:`QueueFull` at once
(the service answers 503 with ``Retry-After``), so memory never grows with the load.

A request whose client went away is cancelled: its image is skipped when its batch is formed.
An exception of the model fails the requests of that batch only; the worker goes on. Should the
worker itself stop (an error outside the model's call), it fails every request it holds or
that waits, records why (:attr:`MicroBatcher.failure`), and :meth:`MicroBatcher.submit`
refuses at once from then on (:class:`WorkerDead`): nothing is left waiting on a worker that is
gone, and ``/healthz`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

_STOP = object()
log = logging.getLogger("ptxseg.serve")


class QueueFull(Exception):
    """The batcher's queue holds ``capacity`` images already."""


class WorkerDead(Exception):
    """The worker thread that owns the model has stopped (the service cannot answer)."""


class MicroBatcher:
    """Batches single images for ``run_batch`` (see the module doc).

    Args:
        run_batch: probabilities ``(B, S, S)`` of a uint8 batch ``(B, 1, S, S)``
            (:meth:`ptxseg.predictor.Predictor.batch_probs`); called from the worker thread
            only.
        max_batch: the most images per call.
        max_wait_s: how long the first image of a batch waits for others.
        capacity: the most images waiting (not counting the batch being computed).
    """

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_wait_s: float,
        capacity: int,
    ):
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1, max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.batch_sizes: Counter[int] = Counter()  # size -> batches run (for /healthz)
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._held: list = []  # the jobs the worker has taken and not answered yet
        self._dead_lock = threading.Lock()  # a job is queued or the worker is declared dead
        #: why the worker stopped (``"OverflowError: ..."``), ``None`` while it runs
        self.failure: str | None = None

    # -- the caller's side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ptxseg-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the images already queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)  # blocks at most until the worker takes a batch
            self._thread.join(timeout)
            self._thread = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """The worker runs (started, not stopped, not dead)."""
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def submit(self, x: np.ndarray) -> Future:
        """Queue one image ``(1, S, S)`` uint8; its future gives its ``(S, S)`` probabilities.

        Raises:
            QueueFull: ``capacity`` images are waiting already.
            WorkerDead: the worker has stopped on an error.
        """
        if self._thread is None:
            raise RuntimeError("the batcher is not running (start() first)")
        future: Future = Future()
        with self._dead_lock:
            if self.failure is not None:
                raise WorkerDead(f"the model worker has stopped ({self.failure})")
            try:
                self._queue.put_nowait((x, future))
            except queue.Full:
                raise QueueFull(f"{self.capacity} images waiting for the model") from None
        return future

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """:meth:`submit` awaited from the event loop (a cancelled request cancels its job)."""
        return await asyncio.wrap_future(self.submit(x))

    # -- the worker ----------------------------------------------------------------------------

    def _gather(self, first) -> tuple[list, bool]:
        jobs, stopping = [first], False
        self._held = jobs  # the same list: what is gathered is held
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stopping = True
                break
            jobs.append(job)
        return jobs, stopping

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the worker is gone: said, never hidden
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """Record why the worker stopped and fail every job it holds or that waits."""
        from ptxseg.errors import one_line

        with self._dead_lock:
            self.failure = one_line(f"{type(exc).__name__}: {exc}")
            dead = WorkerDead(f"the model worker has stopped ({self.failure})")
            jobs = list(self._held)
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        log.error("the model worker has stopped: %s; every request now fails (restart the "
                  "service)", self.failure, exc_info=exc)  # fmt: skip
        for job in jobs:
            if job is not _STOP:
                _fail(job[1], dead)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs, stopping = self._gather(first)
            # a job whose request was cancelled meanwhile is dropped here
            jobs = [(x, f) for x, f in jobs if f.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                probs = self.run_batch(np.stack([x for x, _ in jobs]))
            except BaseException as exc:  # noqa: BLE001 - handed to the requests of this batch
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            self.batch_sizes[len(jobs)] += 1
            for (_, future), p in zip(jobs, probs, strict=True):
                future.set_result(p)
            self._held = []
        while True:  # stopped: whatever is left is cancelled, never left waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job[1].cancel()


def _fail(future: Future, exc: BaseException) -> None:
    """Fail a job's future whatever its state (a cancelled or answered one is left as is)."""
    if future.done():
        return
    if future.running() or future.set_running_or_notify_cancel():
        future.set_exception(exc)
