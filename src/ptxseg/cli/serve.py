"""``ptxseg serve RUN``: the HTTP service and viewer of one run (:mod:`ptxseg.serve`).

Every option is checked (numbers finite and in range, the token, the bind, the Host names) and
the model loaded before the port is opened; a missing ``serve`` extra is one red line naming
it. While it serves, the log is one line per record and per request, escaped
(:mod:`ptxseg.serve.logs`).
"""

from __future__ import annotations

import os
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
from ptxseg.cli.models import MODEL_RUN_HELP, ModelsOption, ThresholdsOption
from ptxseg.errors import printable
from ptxseg.hardware import CPU_BATCH, INFERENCE_BATCH, Device
from ptxseg.predictor import Backend
from ptxseg.tta import Tta

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@app.command(help="Serve the run's model over HTTP: POST /v1/predict, a viewer page at /, the "
                  "API reference at /docs (needs the serve extra). Beyond 127.0.0.1 it needs a "
                  "token (--token-file or PTXSEG_SERVE_TOKEN).")  # fmt: skip
def serve(
    run: Annotated[Path, typer.Argument(help=MODEL_RUN_HELP)],
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (0.0.0.0: every interface; any "
                     "address but loopback needs a token or --insecure)."),
    ] = DEFAULT_HOST,  # fmt: skip
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).")] = DEFAULT_PORT,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the bearer token every request but "
                     "/healthz and the pages must carry (one line, at least 16 characters); or "
                     "set PTXSEG_SERVE_TOKEN.", show_default=False),
    ] = None,  # fmt: skip
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Serve beyond loopback without a token (anyone who "
                     "reaches the port can use it)."),
    ] = False,  # fmt: skip
    allowed_host: Annotated[
        list[str] | None,
        typer.Option("--allowed-host", help="A Host name clients use (besides 127.0.0.1, "
                     "localhost, [::1] and the --host address): a name, an address, "
                     "*.domain or *; repeat it. Other Host headers get 400 (DNS rebinding).",
                     show_default=False),
    ] = None,  # fmt: skip
    thresholds: ThresholdsOption = None,
    tta: Annotated[
        Tta | None,
        typer.Option("--tta", help="Test-time augmentation (default: the one the run's "
                                   "thresholds were tuned with, else none).",
                     show_default=False),
    ] = None,  # fmt: skip
    backend: BackendOption = Backend.TORCH,
    device: DeviceOption = Device.AUTO,
    model_path: ModelsOption = None,
    max_batch: Annotated[
        int | None,
        typer.Option("--max-batch", help="Most images per forward pass, 1-1024 (default: "
                     f"{INFERENCE_BATCH} GPU, {CPU_BATCH} CPU)."),
    ] = None,  # fmt: skip
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", help="How long a batch's first image waits for others, "
                     "0-10000 ms."),
    ] = 5.0,  # fmt: skip
    queue: Annotated[
        int | None,
        typer.Option("--queue", help="Most requests in the service at once, their bodies "
                     "read; one more gets 503 (default: max(16, 2 x --max-batch))."),
    ] = None,  # fmt: skip
    max_uploads: Annotated[
        int | None,
        typer.Option("--max-uploads", help="Most request bodies being received at once; one "
                     "more gets 503 (default: 4 x --queue)."),
    ] = None,  # fmt: skip
    body_timeout_s: Annotated[
        float,
        typer.Option("--body-timeout-s", help="Time a request's body has to arrive whole, "
                     "0.1-3600 s; later: 408 and the connection closed."),
    ] = 60.0,  # fmt: skip
    max_body_mb: Annotated[
        float,
        typer.Option("--max-body-mb", help="Largest request body, 0.001-2000 MB; larger: 413."),
    ] = 50.0,
) -> None:
    from ptxseg.serve import EXTRA_HINT, missing_extra

    missing = missing_extra()
    if missing:
        fail(f"ptxseg serve needs the serve extra ({', '.join(missing)} missing): {EXTRA_HINT}")
    import uvicorn

    from ptxseg.serve import access, logs
    from ptxseg.serve.app import create_app
    from ptxseg.serve.service import Limits, Service, check_range

    check_range("--port", port, 0, 65535, "")
    limits = Limits(max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue=queue,
                    max_body_mb=max_body_mb, body_timeout_s=body_timeout_s,
                    max_uploads=max_uploads)  # fmt: skip
    token = access.load_token(token_file, os.environ)
    access.check_bind(host, token, insecure)
    rules = access.Access(token=token, hosts=access.allowed_hosts(host, allowed_host or ()))
    with library_warnings():
        service = Service.from_run(run, thresholds=thresholds, tta=tta, backend=backend,
                                   model=model_path, device=device, limits=limits)  # fmt: skip
    sock = listen(host, port)  # before the first line: a port in use is one red line
    port = sock.getsockname()[1]
    info = service.model_info()
    shown = f"[{host}]" if ":" in host else host
    err_console.print(
        Text(
            f"serving {printable(run)} ({service.describe()}, tta {info['tta']}, "
            f"{info['device']}; rule {info['thresholds_rule']}) on http://{shown}:{port}/ "
            "(API: /docs; Ctrl+C stops)"
        ),
        soft_wrap=True,
    )
    if token is not None:
        said = ("access: the bearer token is needed (all but /healthz and the pages); Host "
                f"names: {', '.join(rules.hosts)}")  # fmt: skip
    elif access.is_loopback(host):
        said = f"access: this machine only, no token; Host names: {', '.join(rules.hosts)}"
    else:
        said = (f"warning: --insecure: no token, anyone who reaches {shown}:{port} can use the "
                f"service; Host names: {', '.join(rules.hosts)}")  # fmt: skip
    err_console.print(Text(said), soft_wrap=True, highlight=False)
    config = uvicorn.Config(create_app(service, rules), log_config=None, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10)  # fmt: skip
    server = uvicorn.Server(config)
    with sock, logs.installed():
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
