"""The micro-batcher of ``ptxseg serve`` on its own: batch sizes, order, a bounded queue,
failures confined to their batch, cancelled requests skipped, nothing left waiting on stop or
on a worker that died."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from ptxseg.serve.batcher import MicroBatcher, QueueFull, WorkerDead


class Model:
    """Output = the input's first pixel everywhere; batches recorded; optionally
    held at a gate, or failing for an input whose first pixel is 13."""

    def __init__(self, hold: bool = False):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert self.gate.wait(30)
        values = [int(v) for v in x[:, 0, 0, 0]]
        self.batches.append(values)
        if 13 in values:
            raise RuntimeError("bad batch")
        return np.stack([np.full(x.shape[2:], v, np.float32) for v in values])


def image(v: int) -> np.ndarray:
    return np.full((1, 4, 4), v, np.uint8)


def test_waiting_images_share_batches_in_order():
    model = Model(hold=True)
    b = MicroBatcher(model, max_batch=3, max_wait_s=0.0, capacity=10)
    b.start()
    try:
        futures = [b.submit(image(v)) for v in range(1, 8)]
        model.gate.set()
        results = [f.result(30) for f in futures]
    finally:
        b.stop()
    assert [float(r[0, 0]) for r in results] == list(range(1, 8))
    flat = [v for batch in model.batches for v in batch]
    assert flat == list(range(1, 8)) and max(map(len, model.batches)) == 3
    assert sum(b.batch_sizes[k] * k for k in b.batch_sizes) == 7


def test_a_full_queue_refuses_at_once():
    model = Model(hold=True)
    b = MicroBatcher(model, max_batch=1, max_wait_s=0.0, capacity=2)
    b.start()
    try:
        first = b.submit(image(1))
        while not first.running():  # the worker holds the first image at the model
            threading.Event().wait(0.01)
        queued = [b.submit(image(2)), b.submit(image(3))]
        with pytest.raises(QueueFull, match="2 images waiting for the model"):
            b.submit(image(4))
        model.gate.set()
        assert [float(f.result(30)[0, 0]) for f in (first, *queued)] == [1, 2, 3]
    finally:
        b.stop()


def test_a_failing_batch_fails_its_requests_only():
    model = Model(hold=True)
    b = MicroBatcher(model, max_batch=2, max_wait_s=0.0, capacity=10)
    b.start()
    try:
        futures = [b.submit(image(v)) for v in (12, 13, 14, 15)]
        model.gate.set()
        with pytest.raises(RuntimeError, match="bad batch"):
            futures[1].result(30)
        assert float(futures[3].result(30)[0, 0]) == 15
    finally:
        b.stop()
    failed = next(batch for batch in model.batches if 13 in batch)
    for v, f in zip((12, 13, 14, 15), futures, strict=True):
        assert (f.exception() is not None) == (v in failed)


def test_cancelled_requests_are_skipped_and_stop_leaves_none_waiting():
    model = Model(hold=True)
    b = MicroBatcher(model, max_batch=1, max_wait_s=0.0, capacity=10)
    b.start()
    first = b.submit(image(1))
    while not first.running():  # the worker holds it at the model
        threading.Event().wait(0.01)
    cancelled = b.submit(image(2))
    assert cancelled.cancel()
    kept = b.submit(image(3))
    model.gate.set()
    assert float(kept.result(30)[0, 0]) == 3
    b.stop()
    assert [v for batch in model.batches for v in batch] == [1, 3]
    with pytest.raises(CancelledError):
        cancelled.result(0)
    with pytest.raises(RuntimeError, match="not running"):
        b.submit(image(4))


def test_a_worker_that_dies_fails_every_request_and_refuses_new_ones():
    """An error outside the model's call (the wait of an infinite batch window: the
    OverflowError `--batch-wait-ms inf` caused) ends the worker: every request it held or
    that waited fails at once with the reason, none is left waiting, later ones are refused."""
    model = Model()
    b = MicroBatcher(model, max_batch=4, max_wait_s=float("inf"), capacity=10)
    b.start()
    try:
        outcomes = []
        for v in (1, 2, 3):
            try:
                outcomes.append(b.submit(image(v)))
            except WorkerDead as exc:  # the worker may have died before this one came
                outcomes.append(exc)
        for outcome in outcomes:
            if not isinstance(outcome, WorkerDead):
                with pytest.raises(WorkerDead, match=r"the model worker has stopped \(Overflow"):
                    outcome.result(10)
        assert not b.alive and b.failure.startswith("OverflowError: ")
        with pytest.raises(WorkerDead, match="OverflowError"):
            b.submit(image(4))
        assert b.waiting == 0 and model.batches == []
    finally:
        b.stop()
