"""The node: the C-STORE SCP, the worker that segments and the sender that delivers, around
one spool folder.

1. A C-STORE handler (:mod:`ptxseg.dicomnode.scp`) decodes the instance, writes it to the
   spool (:meth:`Spool.receive`: fsync'd before the success status) and queues it.
2. The worker thread takes up to ``max_batch`` queued images (waiting ``batch_wait_ms`` for a
   batch to fill), segments them in one forward pass (:func:`ptxseg.dicomnode.segment.segment`:
   predict's masks), measures each (:func:`ptxseg.measures.measure`), writes its SEG
   (:func:`ptxseg.dicomseg.build_segmentation`), SR (:func:`ptxseg.dicomnode.report.build_report`)
   and, with ``secondary_capture``, its overlay (:mod:`ptxseg.dicomnode.capture`) to the spool,
   and queues it for sending. An image that cannot be segmented goes to ``failed/`` with the
   reason (one log line).
3. The sender thread sends the ready results of up to :data:`SEND_GROUP` images through one
   session of the destination (SEG first: the SR references it); a failure is logged and
   retried after the :class:`~ptxseg.dicomnode.sender.Backoff` delay, the results waiting in
   the spool. Once every file of an image is stored, its record goes to ``done/`` and one log
   line says it all: the image, the finding, when it was received, the inference, the
   destination and the latency (received -> last result stored).

At start, :meth:`Spool.recover` puts back what a previous run left: images to segment, results
to send (see :mod:`ptxseg.dicomnode.spool`).
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptxseg.dicomnode.scp import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    Refused,
    Tls,
    build_ae,
    check_instance,
    status,
    tls_context,
)
from ptxseg.dicomnode.sender import Backoff, SendError
from ptxseg.dicomnode.spool import Spool
from ptxseg.errors import DataError, PtxsegError
from ptxseg.fileio import folder_lock

log = logging.getLogger("ptxseg.dicomnode")

#: the most images whose results one session of the destination carries
SEND_GROUP = 16
#: decoded images kept in memory between the C-STORE and the worker (else read from the spool)
DECODED_CACHE = 64


@dataclass(frozen=True)
class Options:
    """How the node listens and works.

    Args:
        ae_title: the node's AE title (the called AE title it answers to).
        host, port: where it listens (port 0: a free one).
        allow: the calling AE titles accepted (empty: any, only on a loopback host).
        tls: the listening side's TLS files, or None.
        secondary_capture: also send the captioned overlay as a Secondary Capture.
        max_batch: the most images per forward pass (default: the predictor's batch size).
        batch_wait_ms: how long a batch's first image waits for others.
        backoff: the delays between attempts to deliver.
    """

    ae_title: str = "PTXSEG"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()
    tls: Tls | None = None
    secondary_capture: bool = False
    max_batch: int | None = None
    batch_wait_ms: float = 20.0
    backoff: Backoff = field(default_factory=Backoff)


class Node:
    """A running DICOM node (see the module doc): :meth:`start`, then :meth:`stop`."""

    def __init__(self, predictor, rule, algorithm, spool: Spool, destination,
                 options: Options = Options()):  # fmt: skip
        self.predictor = predictor
        self.rule = rule  # a ptxseg.run.Thresholds at the predictor's size
        self.params = rule.params
        self.algorithm = algorithm
        self.spool = spool
        self.destination = destination
        self.options = options
        self.max_batch = options.max_batch or predictor.batch_size
        self.port: int | None = None
        self._to_segment: queue.Queue[str] = queue.Queue()
        self._to_send: collections.deque[str] = collections.deque()
        self._send_ready = threading.Condition()
        self._stopping = threading.Event()
        self._decoded: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._callers: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._lock_cm = None
        self.failures_in_a_row = 0
        self.recovered = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> int:
        """Lock and recover the spool, start the worker and the sender, then listen; returns
        the port.

        Raises:
            PtxsegError: the spool is used by another node, or the port cannot be opened.
        """
        from ptxseg.fileio import FolderBusy

        _import_all()
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self._lock_cm = folder_lock(self.spool.root, ".ptxseg-dicom-node.lock")
        try:
            self._lock_cm.__enter__()
        except FolderBusy as exc:
            self._lock_cm = None
            holder = f" (pid {exc.pid})" if exc.pid else ""
            raise PtxsegError(f"{self.spool.root}: spool in use by another node{holder}") from None
        try:
            self.recovered = self.spool.recover()
            for key in self.recovered.to_segment:
                self._to_segment.put(key)
            self._to_send.extend(self.recovered.to_send)
            for target, name in ((self._work, "ptxseg-node-worker"),
                                 (self._send_loop, "ptxseg-node-sender")):  # fmt: skip
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
            self._server = self._listen()
        except BaseException:
            self.stop()
            raise
        self.port = self._server.server_address[1]
        return self.port

    def _listen(self):
        ae, handlers = build_ae(self.options.ae_title, self.options.allow, self._on_store,
                                self._on_echo)  # fmt: skip
        context = tls_context(self.options.tls) if self.options.tls is not None else None
        try:
            return ae.start_server((self.options.host, self.options.port), block=False,
                                   evt_handlers=handlers, ssl_context=context)  # fmt: skip
        except OSError as exc:
            raise PtxsegError(f"--host {self.options.host} --port {self.options.port}: cannot "
                              f"listen ({exc.strerror or exc})") from None  # fmt: skip

    def stop(self) -> None:
        """Stop listening, let the worker finish its batch and the sender its session."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._send_ready:
            self._send_ready.notify_all()
        for thread in self._threads:
            thread.join(60)
        self._threads = []
        if self._lock_cm is not None:
            self._lock_cm.__exit__(None, None, None)
            self._lock_cm = None

    def healthy(self) -> bool:
        """The worker and the sender are alive and the spool is a writable folder."""
        import os

        alive = len(self._threads) == 2 and all(t.is_alive() for t in self._threads)
        return alive and os.access(self.spool.root, os.W_OK)

    def pending(self) -> int:
        """Images received whose results are not all delivered yet."""
        counts = self.spool.counts()
        return counts["received"] + counts["results"]

    # -- the SCP's handlers (pynetdicom's threads) ---------------------------------------

    def _on_echo(self, event):
        return SUCCESS if self.healthy() else PROCESSING_FAILURE

    def _on_store(self, event):
        caller = str(event.assoc.requestor.ae_title).strip()
        uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            data = event.encoded_dataset(include_meta=True)
            key, decoded = check_instance(data, uid, str(event.context.abstract_syntax))
            if not self.spool.receive(key, data):
                log.info("%s from %s: already answered, not processed again", key, caller)
                return status(SUCCESS)
        except Refused as exc:
            log.warning("%s from %s: refused, status 0x%04X (%s)", uid[:64], caller, exc.status,
                        exc.comment)  # fmt: skip
            return status(exc.status, exc.comment)
        except OSError as exc:
            log.error("%s from %s: spool not written (%s): refused", uid[:64], caller, exc)
            return status(OUT_OF_RESOURCES, "spool not writable")
        except Exception as exc:  # noqa: BLE001 - the sender gets a status, the node serves on
            log.error("%s from %s: refused (%s: %s)", uid[:64], caller, type(exc).__name__, exc)
            return status(PROCESSING_FAILURE, type(exc).__name__)
        with self._cache_lock:
            self._callers[key] = caller
            self._decoded[key] = decoded
            while len(self._decoded) > DECODED_CACHE:
                self._decoded.popitem(last=False)
        self._to_segment.put(key)
        return status(SUCCESS)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        wait_s = self.options.batch_wait_ms / 1000.0
        while not self._stopping.is_set():
            try:
                first = self._to_segment.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._to_segment.get(timeout=max(remaining, 0.0))
                                 if remaining > 0 else self._to_segment.get_nowait())  # fmt: skip
                except queue.Empty:
                    break
            try:
                self._process(list(dict.fromkeys(batch)))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the node
                log.exception("batch of %d images failed; they stay in the spool (segmented at "
                              "the next start)", len(batch))  # fmt: skip

    def _read(self, key: str):
        """The decoded image and header of ``key``: from the C-STORE's decode when still in
        memory, else read from the spool by predict's reader."""
        from ptxseg.data.imageio import read_image_header

        with self._cache_lock:
            decoded = self._decoded.pop(key, None)
        if decoded is not None:
            return decoded.image, decoded.dataset
        return read_image_header(self.spool.received_path(key))

    def _process(self, keys: list[str]) -> None:
        from ptxseg.dicomnode.segment import segment

        items = []
        for key in keys:
            if not self.spool.received_path(key).exists():
                continue  # a duplicate in the queue, already answered
            try:
                image, header = self._read(key)
            except (DataError, OSError) as exc:
                self._fail(key, f"cannot read ({exc})")
                continue
            items.append((key, image, header))
        if not items:
            return
        t0 = time.perf_counter()
        segmented = segment(self.predictor, self.params, [image for _, image, _ in items])
        inference_ms = (time.perf_counter() - t0) * 1000.0
        for (key, image, header), result in zip(items, segmented, strict=True):
            try:
                self._write_results(key, image, header, result, inference_ms, len(items))
            except (DataError, PtxsegError) as exc:
                self._fail(key, str(exc))
            except OSError as exc:
                log.error("%s: results not written (%s); it stays in the spool (segmented at the "
                          "next start)", key, exc)  # fmt: skip
                continue
            with self._send_ready:
                self._to_send.append(key)
                self._send_ready.notify()

    def _caller(self, key: str) -> str | None:
        """Who sent ``key`` (unknown after a restart)."""
        with self._cache_lock:
            return self._callers.pop(key, None)

    def _fail(self, key: str, reason: str) -> None:
        self._caller(key)
        log.error("%s: not segmented, kept in %s (%s)", key, self.spool.root / "failed", reason)
        self.spool.fail(key, reason)

    def _write_results(self, key, image, header, result, inference_ms: float, batch: int) -> None:
        from ptxseg.dicomnode.report import build_report
        from ptxseg.dicomseg import build_segmentation
        from ptxseg.measures import measure, read_geometry

        name = f"{key}.dcm"
        geometry = read_geometry(name, header)
        measures = measure(result.mask, geometry, max_prob=result.max_prob)
        seg = build_segmentation(header, result.mask, self.algorithm, name=name)
        sr = build_report(header, seg, measures, self.algorithm, name=name)
        files = {"seg": _encode(seg), "sr": _encode(sr)}
        record: dict[str, Any] = {
            "sop_instance_uid": key,
            "calling_aet": self._caller(key),
            "received_at": self.spool.received_at(key),
            "inferred_at": time.time(),
            "inference_ms": round(inference_ms, 1),
            "batch": batch,
            "height": int(result.mask.shape[0]),
            "width": int(result.mask.shape[1]),
            "has_pneumothorax": measures.area_px > 0,
            **measures.to_dict(),
            "seg_uid": str(seg.SOPInstanceUID),
            "sr_uid": str(sr.SOPInstanceUID),
        }
        if self.options.secondary_capture:
            from ptxseg.dicomnode.capture import build_capture

            sc = build_capture(header, image, result.mask, measures, geometry, self.algorithm,
                               name=name)  # fmt: skip
            files["sc"] = _encode(sc)
            record["sc_uid"] = str(sc.SOPInstanceUID)
        self.spool.write_results(key, files, record)

    # -- the sender ------------------------------------------------------------------------

    def _send_loop(self) -> None:
        retry_at = 0.0
        while not self._stopping.is_set():
            with self._send_ready:
                while not self._to_send and not self._stopping.is_set():
                    self._send_ready.wait(0.5)
                if self._stopping.is_set():
                    return
                group = [self._to_send.popleft()
                         for _ in range(min(SEND_GROUP, len(self._to_send)))]  # fmt: skip
            wait = retry_at - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                return
            delivered = self._deliver(group)
            if delivered < len(group):
                self.failures_in_a_row += 1
                delay = self.options.backoff.delay(self.failures_in_a_row)
                retry_at = time.monotonic() + delay
                log.warning("%d image(s) waiting in the spool for %s; attempt %d failed, next "
                            "in %.0f s", len(group) - delivered, self.destination.description,
                            self.failures_in_a_row, delay)  # fmt: skip
                with self._send_ready:
                    self._to_send.extendleft(reversed(group[delivered:]))
            else:
                self.failures_in_a_row = 0
                retry_at = 0.0

    def _deliver(self, group: list[str]) -> int:
        """Send the results of ``group`` through one session; returns how many images were
        wholly delivered (in order: the first failure stops the session)."""
        done = 0
        try:
            with self.destination.session() as session:
                for key in group:
                    for name, path in self.spool.unsent(key):
                        session.send(path)
                        self.spool.mark_sent(key, name)
                    self._finish(key)
                    done += 1
                    if self._stopping.is_set():
                        break
        except SendError as exc:
            log.warning("%s", exc)
        except Exception as exc:  # noqa: BLE001 - a broken file, a full disk: logged, retried
            log.error("sending to %s failed (%s: %s)", self.destination.description,
                      type(exc).__name__, exc)  # fmt: skip
        return done

    def _finish(self, key: str) -> None:
        record = self.spool.result_record(key)
        sent_at = time.time()
        latency = sent_at - float(record.get("received_at", sent_at))
        record.update(sent_at=sent_at, latency_s=round(latency, 3),
                      destination=self.destination.description)  # fmt: skip
        self.spool.finish(key, record)
        log.info("%s", image_line(record))


def _import_all() -> None:
    """Import, on the calling thread, every module the node's threads use: two threads
    importing pydicom at once can see it half initialised (a circular-import error)."""
    import highdicom  # noqa: F401
    import pydicom  # noqa: F401
    import pynetdicom  # noqa: F401

    import ptxseg.data.imageio  # noqa: F401
    import ptxseg.dicomnode.capture  # noqa: F401
    import ptxseg.dicomnode.report  # noqa: F401
    import ptxseg.dicomnode.segment  # noqa: F401
    import ptxseg.dicomseg  # noqa: F401
    import ptxseg.measures  # noqa: F401


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def image_line(record: dict[str, Any]) -> str:
    """The one log line of a delivered image."""
    if record.get("has_pneumothorax"):
        area = record.get("area_cm2")
        size = f"{area:.1f} cm2" if area is not None else f"{record.get('area_px')} px"
        finding = f"pneumothorax, {record.get('side')}, {size}"
    else:
        finding = "no pneumothorax"
    received = time.strftime("%H:%M:%S", time.localtime(float(record.get("received_at", 0))))
    caller = record.get("calling_aet") or "?"
    files = "+".join(f.upper() for f in record.get("files", []))
    return (f"{record.get('sop_instance_uid')} from {caller}: {finding} (max p "
            f"{float(record.get('max_prob') or 0):.2f}); received {received}, inferred in "
            f"{record.get('inference_ms')} ms (batch of {record.get('batch')}), {files} sent to "
            f"{record.get('destination')}; latency {record.get('latency_s'):.2f} s")


def load(run: str | Path, *, spool: str | Path, destination, options: Options = Options(),
         thresholds: str | Path | None = None, tta: str = "none", backend: str = "torch",
         model: str | Path | None = None, device: str = "auto") -> Node:  # fmt: skip
    """A node for the model of ``run`` (loaded as ``ptxseg predict`` loads it: the run's rule,
    ``--thresholds``, ``tta``...), its spool folder and destination; not started.

    Raises:
        PtxsegError: a missing run folder, an unusable checkpoint, model or thresholds file.
    """
    from ptxseg.image_outputs import seg_algorithm
    from ptxseg.predictor import Predictor
    from ptxseg.run import Run

    run = Run.open(run)
    predictor = Predictor.from_run(run, backend=backend, model=model, device=device, tta=tta,
                                   batch_size=options.max_batch, compile=False)  # fmt: skip
    rule = run.thresholds(thresholds, predictor.size)
    algorithm = seg_algorithm(run.path.resolve().name, [m.path for m in predictor.members],
                              predictor.tta, rule.params)  # fmt: skip
    return Node(predictor, rule, algorithm, Spool(spool), destination, options)
