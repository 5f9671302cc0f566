"""``ptxseg dicom-node RUN``: the DICOM node of one run (:mod:`ptxseg.dicomnode`).

The model is loaded and every option checked before the port is opened; a missing
``dicom-node`` extra is one red line naming it. One log line per delivered image on stderr;
Ctrl+C or SIGTERM stops it (the batch in hand is finished, the spool keeps the rest).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptxseg.cli.app import (
    BackendOption,
    DeviceOption,
    TtaOption,
    app,
    err_console,
    fail,
    library_warnings,
)
from ptxseg.cli.models import RUN_HELP, ThresholdsOption
from ptxseg.errors import printable
from ptxseg.hardware import CPU_BATCH, INFERENCE_BATCH, Device
from ptxseg.predictor import Backend
from ptxseg.tta import Tta

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11112
DEFAULT_AE_TITLE = "PTXSEG"


def is_loopback(host: str) -> bool:
    """``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command(
    "dicom-node",
    help="Receive radiographs by DICOM C-STORE, segment them with the run's model and send a "
         "DICOM SEG and SR (TID 1500) per image back by C-STORE or STOW-RS (needs the "
         "dicom-node extra).",
)  # fmt: skip
def dicom_node(
    run: Annotated[Path, typer.Argument(help=RUN_HELP)],
    spool: Annotated[
        Path,
        typer.Option("--spool", help="Spool folder: what was received and is not yet answered "
                     "(kept across restarts)."),
    ],  # fmt: skip
    send_to: Annotated[
        str | None,
        typer.Option("--send-to", metavar="AET@HOST:PORT",
                     help="Send the results by C-STORE to this DICOM node (e.g. the PACS)."),
    ] = None,  # fmt: skip
    stow: Annotated[
        str | None,
        typer.Option("--stow", metavar="URL",
                     help="Send the results by DICOMweb STOW-RS to this root URL instead."),
    ] = None,  # fmt: skip
    ae_title: Annotated[
        str, typer.Option("--ae-title", help="The node's AE title.")
    ] = DEFAULT_AE_TITLE,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (beyond this machine: needs --allow)."),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = DEFAULT_PORT,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", metavar="AET",
                     help="A calling AE title allowed to send (repeat it; default: any, on "
                          "this machine only)."),
    ] = None,  # fmt: skip
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="TLS: the node's certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="TLS: the node's private key (PEM).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="TLS: require client certificates signed by this CA (PEM)."),
    ] = None,
    secondary_capture: Annotated[
        bool,
        typer.Option("--secondary-capture",
                     help="Also send the captioned overlay as a Secondary Capture image (marked "
                          "not for diagnostic use)."),
    ] = False,  # fmt: skip
    thresholds: ThresholdsOption = None,
    tta: TtaOption = Tta.NONE,
    backend: BackendOption = Backend.TORCH,
    device: DeviceOption = Device.AUTO,
    model_path: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint (torch) or ONNX file (onnx) to use instead."),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option("--max-batch", min=1, help="Most images per forward pass (default: "
                     f"{INFERENCE_BATCH} GPU, {CPU_BATCH} CPU)."),
    ] = None,  # fmt: skip
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", min=0.0,
                     help="How long a batch's first image waits for others."),
    ] = 20.0,  # fmt: skip
    retry_max_s: Annotated[
        float,
        typer.Option("--retry-max-s", min=1.0,
                     help="Longest wait between two attempts to deliver (the wait doubles "
                          "from 1 s after each failure)."),
    ] = 60.0,  # fmt: skip
) -> None:
    from ptxseg.dicomnode import EXTRA_HINT, missing_extra

    missing = missing_extra()
    if missing:
        fail(f"ptxseg dicom-node needs the dicom-node extra ({', '.join(missing)} missing): "
             f"{EXTRA_HINT}")  # fmt: skip
    from ptxseg.dicomnode.node import Options, load
    from ptxseg.dicomnode.scp import Tls, check_ae_title
    from ptxseg.dicomnode.sender import Backoff, DicomDestination, StowDestination

    if (send_to is None) == (stow is None):
        fail("--send-to / --stow: give exactly one destination for the results")
    title = check_ae_title(ae_title, "--ae-title")
    allowed = tuple(check_ae_title(a, "--allow") for a in allow or ())
    if not is_loopback(host) and not allowed:
        fail(f"--host {host}: a node listening beyond this machine needs --allow (the calling "
             "AE titles it accepts)")  # fmt: skip
    if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
        fail("--tls-cert / --tls-key: TLS needs both (and --tls-ca needs them)")
    tls = Tls(tls_cert, tls_key, tls_ca) if tls_cert is not None else None
    destination = (DicomDestination(send_to, title) if send_to is not None
                   else StowDestination(stow))  # fmt: skip
    options = Options(ae_title=title, host=host, port=port, allow=allowed, tls=tls,
                      secondary_capture=secondary_capture, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, backoff=Backoff(first_s=1.0, max_s=retry_max_s))
    with library_warnings():
        node = load(run, spool=spool, destination=destination, options=options,
                    thresholds=thresholds, tta=tta, backend=backend, model=model_path,
                    device=device)  # fmt: skip
    _log_lines()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    port = node.start()
    try:
        recovered = node.recovered
        waiting = len(recovered.to_segment) + len(recovered.to_send)
        member = node.predictor.members[0]
        shown = f"[{host}]" if ":" in host else host
        err_console.print(
            Text(
                f"dicom-node {title} on {shown}:{port}{' (TLS)' if tls else ''}: "
                f"{printable(run)} ({member.arch}/{member.encoder}, {node.predictor.size} px, "
                f"tta {node.predictor.tta}, {node.predictor.device}; rule "
                f"{node.rule.params.describe()}); results to {destination.description}; spool "
                f"{printable(spool)} ({waiting} waiting); allowed: "
                f"{', '.join(allowed) if allowed else 'any calling AE title'} (Ctrl+C stops)"
            ),
            soft_wrap=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
    err_console.print(f"stopped ({node.pending()} image(s) left in the spool)", highlight=False,
                      markup=False)  # fmt: skip


def _log_lines() -> None:
    """The node's log lines on stderr, one per event, time first; pynetdicom's own are not
    shown (the node logs every refusal and failed delivery itself)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))  # fmt: skip
    node_log = logging.getLogger("ptxseg.dicomnode")
    node_log.addHandler(handler)
    node_log.setLevel(logging.INFO)
    node_log.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
