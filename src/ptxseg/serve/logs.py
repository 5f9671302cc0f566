"""The log of ``ptxseg serve``: one line per record, whatever came from an upload escaped, one
line per request.

- :class:`OneLineFormatter`: every record's text goes through :func:`ptxseg.errors.one_line`
  (control characters written ``\\x1b``, ``\\n``, ``\\x00``...), so neither a PatientName quoted
  by a pydicom or highdicom warning, nor a client's file name, path or header can forge a log
  line or send an escape sequence to the terminal. A traceback (an unexpected error only)
  follows its line as lines indented with ``  | ``, its exception text escaped the same way.
- :func:`installed`: the process's one log handler (on the root logger: uvicorn's, pydicom's,
  highdicom's and ptxseg's records all pass through it, at level INFO for ``ptxseg.serve``,
  WARNING for the rest) and Python warnings turned into log records (one line each, no source
  line; a pydicom warning that pydicom also logs is written once).
- :class:`RequestLog`: ASGI middleware that numbers requests (``X-Request-Id``), writes one
  access line per request (``#7 POST /v1/predict 200 0.153 s 127.0.0.1 | xray.png: PNG
  1024x1024, 834,211 bytes``; a failure's one-line reason in place of the image), tags every
  record logged while the request runs with its number (the decode threads included: see
  :func:`in_request_context`), and answers an unexpected error 500 in one line, logging its
  traceback once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import json
import logging
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ptxseg.errors import one_line

LOGGER = "ptxseg.serve"
WARNINGS_LOGGER = "ptxseg.serve.warnings"
ACCESS_LOGGER = "ptxseg.serve.access"
#: the scope key under which a request's log note (a dict) travels
NOTE_KEY = "ptxseg.log"
MAX_QUERY = 200  # characters of a query string kept in an access line

_request: contextvars.ContextVar[int | None] = contextvars.ContextVar("ptxseg_request",
                                                                      default=None)  # fmt: skip
log = logging.getLogger(LOGGER)


class OneLineFormatter(logging.Formatter):
    """``2025-06-01 12:00:00 INFO #7 <message>``: the message escaped onto one line (see the
    module doc); the ``#N`` of the request it was logged in, when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        request = getattr(record, "request_id", None)
        tag = f"#{request} " if request is not None else ""
        name = "" if record.name.startswith(LOGGER) else f"{record.name}: "
        line = f"{when} {record.levelname} {tag}{name}{one_line(record.getMessage())}"
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip("\n").split("\n")
            frames.append(f"{type(exc).__name__}: {exc}")
            line += "".join(f"\n  | {one_line(f)}" for f in frames)
        return line


class _RequestTag(logging.Filter):
    """Adds the request number to each record, and drops a Python warning that pydicom has
    just logged in the same thread (``warn_and_log`` does both)."""

    def __init__(self) -> None:
        super().__init__()
        self._last = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request.get()
        if record.name.startswith("pydicom"):
            self._last.text = record.getMessage()
        elif record.name == WARNINGS_LOGGER:
            if getattr(record, "warning_text", None) == getattr(self._last, "text", None):
                self._last.text = None
                return False
        return True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger(WARNINGS_LOGGER).warning(
        "%s: %s", category.__name__, message, extra={"warning_text": str(message)}
    )


@contextlib.contextmanager
def installed(stream=None) -> Iterator[logging.Handler]:
    """The service's logging for the block (see the module doc): one handler on the root
    logger writing to ``stream`` (default: ``sys.stderr``), Python warnings as its records;
    everything is put back as it was at the end."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(OneLineFormatter())
    handler.addFilter(_RequestTag())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    ours = logging.getLogger(LOGGER)
    saved = (root.level, ours.level, ours.propagate)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    ours.setLevel(logging.INFO)
    ours.propagate = True
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            yield handler
        finally:
            root.removeHandler(handler)
            root.setLevel(saved[0])
            ours.setLevel(saved[1])
            ours.propagate = saved[2]


def in_request_context(fn: Callable, *args: Any) -> Callable[[], Any]:
    """``fn(*args)`` as a callable that runs in the caller's context (its request number), for
    a thread pool: ``loop.run_in_executor`` does not carry context variables over itself."""
    return functools.partial(contextvars.copy_context().run, fn, *args)


def note(request, **fields: Any) -> None:
    """Record what the access line of ``request`` (a Starlette request or its scope) says
    beside its status: ``image`` (what was read) or ``detail`` (why it failed)."""
    scope = getattr(request, "scope", request)
    scope.setdefault(NOTE_KEY, {}).update(fields)


class RequestLog:
    """ASGI middleware: request numbers, one access line per request, unexpected errors
    answered 500 and logged once (see the module doc)."""

    def __init__(self, app) -> None:
        self.app = app
        self._numbers = itertools.count(1)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        number = next(self._numbers)
        token = _request.set(number)
        t0 = time.perf_counter()
        status: list[int] = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                headers = [*message.get("headers", []), (b"x-request-id", str(number).encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error is answered
            detail = one_line(f"internal error ({type(exc).__name__}: {exc})")
            note(scope, detail=detail)
            log.error("unexpected error on %s %s", scope.get("method"), scope.get("path"),
                      exc_info=exc)  # fmt: skip
            if not status:
                body = json.dumps({"detail": detail}).encode()
                with contextlib.suppress(Exception):  # the client may be gone too
                    await sending({"type": "http.response.start", "status": 500, "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]})  # fmt: skip
                    await send({"type": "http.response.body", "body": body})
        finally:
            logging.getLogger(ACCESS_LOGGER).info(
                "%s", access_line(scope, status[0] if status else 499, time.perf_counter() - t0)
            )
            _request.reset(token)


def access_line(scope, status: int, seconds: float) -> str:
    """``POST /v1/predict?images=false 200 0.153 s 127.0.0.1 | <image or reason>`` (escaped
    by the formatter; status 499: no answer was sent, the client went away first)."""
    path = scope.get("path", "")
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        path += "?" + (query if len(query) <= MAX_QUERY else query[:MAX_QUERY] + "...")
    client = (scope.get("client") or ("-",))[0]
    line = f"{scope.get('method', '-')} {path} {status} {seconds:.3f} s {client}"
    noted = scope.get(NOTE_KEY, {})
    said = noted.get("detail") or noted.get("image")
    return f"{line} | {said}" if said else line
