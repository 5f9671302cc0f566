"""``ptxseg serve RUN``: the HTTP service and viewer of one run (:mod:`ptxseg.serve`).

The model is loaded (and every option checked) before the port is opened; a missing
``serve`` extra is one red line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptxseg.cli.app import (
    BackendOption,
    DeviceOption,
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
DEFAULT_PORT = 8000


@app.command(help="Serve the run's model over HTTP: POST /v1/predict, a viewer page at /, the "
                  "API reference at /docs (needs the serve extra).")  # fmt: skip
def serve(
    run: Annotated[Path, typer.Argument(help=RUN_HELP)],
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (0.0.0.0: every interface)."),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = DEFAULT_PORT,
    thresholds: ThresholdsOption = None,
    tta: Annotated[
        Tta | None,
        typer.Option("--tta", help="Test-time augmentation (default: the one the run's "
                                   "thresholds were tuned with, else none).",
                     show_default=False),
    ] = None,  # fmt: skip
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
    ] = 5.0,  # fmt: skip
    queue: Annotated[
        int | None,
        typer.Option("--queue", min=1, help="Most requests in the service at once; one more "
                     "gets 503 (default: max(16, 2 x --max-batch))."),
    ] = None,  # fmt: skip
    max_body_mb: Annotated[
        float,
        typer.Option("--max-body-mb", min=0.001, help="Largest request body, MB; larger: 413."),
    ] = 50.0,
) -> None:
    from ptxseg.serve import EXTRA_HINT, missing_extra

    missing = missing_extra()
    if missing:
        fail(f"ptxseg serve needs the serve extra ({', '.join(missing)} missing): {EXTRA_HINT}")
    import uvicorn

    from ptxseg.serve.app import create_app
    from ptxseg.serve.service import Limits, Service

    limits = Limits(max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue=queue,
                    max_body_mb=max_body_mb)  # fmt: skip
    with library_warnings():
        service = Service.from_run(run, thresholds=thresholds, tta=tta, backend=backend,
                                   model=model_path, device=device, limits=limits)  # fmt: skip
    sock = listen(host, port)  # before the first line: a port in use is one red line
    port = sock.getsockname()[1]
    info = service.model_info()
    shown = f"[{host}]" if ":" in host else host
    err_console.print(
        Text(
            f"serving {printable(run)} ({info['architecture']}/{info['encoder']}, "
            f"{info['input_size']} px, tta {info['tta']}, {info['device']}; rule "
            f"{info['thresholds_rule']}) on http://{shown}:{port}/ (API: /docs; Ctrl+C stops)"
        ),
        soft_wrap=True,
    )
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)  # fmt: skip
    server = uvicorn.Server(config)
    with sock:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops gracefully, then re-raises the Ctrl+C
            pass
    # uvicorn re-raises the signal through asyncio's own SIGINT handler, which does not always
    # turn it into a KeyboardInterrupt here: a stop is said once, however uvicorn returned
    if server.should_exit:
        err_console.print("stopped", highlight=False, markup=False)


def listen(host: str, port: int):
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        fail(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})")
        raise  # unreachable: fail() exits
