"""Who may use ``ptxseg serve``: a bearer token, the Host names it answers to, and the rule
that a service reachable beyond this machine needs a token.

- The token (:func:`load_token`): from a file (``--token-file``, at most 4 KB read by
  :func:`ptxseg.fileio.open_regular`, the one regular-file reader) or the environment
  variable :data:`TOKEN_ENV`; one line of at least :data:`MIN_TOKEN_CHARS` visible ASCII
  characters, never echoed in a message. Every request but those to :data:`OPEN_PATHS` must carry
  ``Authorization: Bearer <token>`` (:class:`BearerAuth`, compared in constant time by
  :func:`hmac.compare_digest`); else 401 with ``WWW-Authenticate: Bearer``. The open paths are
  ``/healthz`` (a load balancer's or orchestrator's probe carries no secret; it tells the load
  and whether the model worker runs, nothing of the model or of any image) and the two pages
  and the schema (``/``, ``/docs``, ``/openapi.json``: the same for every service, no model
  data: the viewer asks ``/v1/model`` with the token the person types in).
- The bind (:func:`check_bind`): a ``--host`` that is not a loopback address is refused
  without a token, unless ``--insecure`` says so.
- Host names (:func:`allowed_hosts`): Starlette's ``TrustedHostMiddleware`` answers 400
  ``Invalid host header`` to a request whose ``Host`` is not allowed (a page of another site
  that re-points its DNS name at this service, DNS rebinding, sends its own name): the loopback
  names, the address bound when it is a specific one, and each ``--allowed-host``.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ptxseg.errors import ConfigError, one_line

TOKEN_ENV = "PTXSEG_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE = 4096  # bytes
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: the paths that need no token (see the module doc)
OPEN_PATHS = frozenset({"/", "/docs", "/openapi.json", "/healthz"})
WILDCARD_BINDS = ("0.0.0.0", "::", "")
_TOKEN = re.compile(r"[\x21-\x7e]+")
_HOST_NAME = re.compile(r"(\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?)")
TOKEN_HINT = 'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))" > token.txt'


def is_loopback(host: str) -> bool:
    """``host`` (a ``--host`` value) is ``localhost`` or a loopback address (127.0.0.0/8,
    ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def checked_token(token: str, where: str) -> str:
    """``token`` if it is one line of at least :data:`MIN_TOKEN_CHARS` visible ASCII
    characters; else a :class:`ConfigError` naming ``where`` (never quoting the token)."""
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise ConfigError(
            f"{where}: the token must be one line of at least {MIN_TOKEN_CHARS} visible ASCII "
            f"characters, no spaces ({TOKEN_HINT})"
        )
    return token


def load_token(token_file: str | Path | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token of ``--token-file`` or of the environment variable :data:`TOKEN_ENV`
    (``None``: neither); surrounding whitespace (the file's last newline) is dropped.

    Raises:
        ConfigError: both are given, or the token is not acceptable (:func:`checked_token`).
        DataError: the file cannot be read (missing, a FIFO, a folder...).
    """
    env = environ.get(TOKEN_ENV)
    if token_file is not None and env is not None:
        raise ConfigError(f"--token-file {one_line(str(token_file))} and {TOKEN_ENV} both give "
                          "a token: use one")  # fmt: skip
    if token_file is not None:
        return checked_token(_read_token_file(token_file), one_line(str(token_file)))
    if env is not None:
        return checked_token(env.strip(), TOKEN_ENV)
    return None


def _read_token_file(path: str | Path) -> str:
    """The text of a token file, read by :func:`ptxseg.fileio.open_regular` (a FIFO, a device
    or a folder is refused) and at most :data:`MAX_TOKEN_FILE` bytes of it (a larger file is
    no token file: refused without reading on)."""
    from ptxseg.errors import DataError
    from ptxseg.fileio import open_regular

    with open_regular(path) as fh:
        data = fh.read(MAX_TOKEN_FILE + 1)
    if len(data) > MAX_TOKEN_FILE:
        raise DataError(path, f"not a token file (over {MAX_TOKEN_FILE:,} bytes)")
    return data.decode("ascii", "replace").strip()


def check_bind(host: str, token: str | None, insecure: bool) -> None:
    """Refuse a ``--host`` beyond loopback without a token, unless ``insecure``.

    Raises:
        ConfigError: the refusal, naming the options that lift it.
    """
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"--host {one_line(host)}: a service reachable from other machines needs a token "
            f"(--token-file FILE or {TOKEN_ENV}; {TOKEN_HINT}), or --insecure to serve "
            "without one"
        )


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The ``Host`` names the service answers to: :data:`LOOPBACK_NAMES`, ``host`` when it is
    one specific address or name, and ``extra`` (``--allowed-host``: a name, an address, a
    ``*.domain`` pattern, or ``*`` for any).

    Raises:
        ConfigError: a value that is no host name, address or pattern (a port, a path...).
    """
    names = list(LOOPBACK_NAMES)
    for value in [*([] if host in WILDCARD_BINDS else [host]), *extra]:
        name = _host_name(value)
        if name is None:
            raise ConfigError(
                f"--allowed-host {one_line(value)!r}: a host name or address without port or "
                "path (e.g. ptx.hospital.org, 10.0.0.5, [fe80::1], *.hospital.org, or *)"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _host_name(value: str) -> str | None:
    """``value`` as ``TrustedHostMiddleware`` compares it (lower case, IPv6 in brackets), or
    ``None`` when it is no host name, address or pattern."""
    value = value.strip().lower()
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return value if value and _HOST_NAME.fullmatch(value) else None
    return f"[{address}]" if address.version == 6 else str(address)


class BearerAuth:
    """ASGI middleware: a request to any path but :data:`OPEN_PATHS` needs ``Authorization:
    Bearer <token>`` (constant-time comparison); else 401, one line of JSON."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self._token = token.encode("ascii")

    def _authorized(self, headers) -> bool:
        given = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, value = given.partition(b" ")
        ok = hmac.compare_digest(value.strip(), self._token)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(
            scope.get("headers", [])
        ):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        from ptxseg.serve.logs import note

        detail = "missing or wrong bearer token (Authorization: Bearer <token>)"
        note(scope, detail=detail)
        response = JSONResponse({"detail": detail}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        await response(scope, receive, send)


@dataclass(frozen=True)
class Access:
    """Who may use a service: ``token`` (``None``: no token asked) and the ``Host`` names it
    answers to (:func:`allowed_hosts`). The token is never shown in a repr."""

    token: str | None = field(default=None, repr=False)
    hosts: tuple[str, ...] = LOOPBACK_NAMES


class HostCheck:
    """ASGI middleware: Starlette's ``TrustedHostMiddleware`` on ``hosts`` (no www redirect),
    with the refused ``Host`` noted for the access line."""

    def __init__(self, app, hosts: Iterable[str]) -> None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        self.app = app
        self.check = TrustedHostMiddleware(self._allowed, allowed_hosts=list(hosts),
                                           www_redirect=False)  # fmt: skip

    async def _allowed(self, scope, receive, send) -> None:
        scope[_HOST_OK] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        await self.check(scope, receive, send)
        if scope["type"] == "http" and not scope.get(_HOST_OK):
            from ptxseg.serve.logs import note

            host = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
            note(scope, detail=f"Host {host.decode('latin-1')[:100]!r} not allowed "
                               "(--allowed-host)")  # fmt: skip


_HOST_OK = "ptxseg.host_ok"
