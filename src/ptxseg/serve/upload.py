"""Request bodies: read under a size and a time limit, and the image taken out of them.

:func:`read_body` counts the bytes as they arrive and stops at the limit (a declared
``Content-Length`` over it is refused before a byte is read), so a large body never sits in
memory; a body not complete within its time limit is refused too (a client that sends a few
bytes and idles holds nothing for long). :func:`image_of` takes the image from what was read:
the part named ``file`` of a ``multipart/form-data`` body (else its first part with a file
name), or the raw body of any other content type. Multipart bodies are parsed in memory
(python-multipart's streaming parser, nothing spooled to disk) under limits of their own: a
boundary of at most 70 characters (RFC 2046) and at most :data:`MAX_PARTS` parts (the parse
stops at the first part over it; python-multipart bounds the header lines of a part).
:func:`image_of` is CPU work on the whole body: the service runs it off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ptxseg.errors import one_line

FILE_FIELD = "file"
MAX_PARTS = 16  # one file is expected; a form may carry a few small fields beside it
MAX_BOUNDARY = 70  # RFC 2046, 5.1.1


class BodyTooLarge(Exception):
    """A request body over the limit (413)."""


class BodyTimeout(Exception):
    """A request body not complete within its time limit (408)."""


class BadUpload(Exception):
    """A request body the image cannot be taken from (400)."""


class ClientGone(Exception):
    """The client closed the connection before its body was complete (nobody to answer)."""


async def read_body(request, limit: int, timeout: float | None = None) -> bytes:
    """The body of a Starlette ``request``, at most ``limit`` bytes, complete within
    ``timeout`` seconds (``None``: no time limit).

    Raises:
        BodyTooLarge: the declared length or the bytes received pass ``limit``.
        BodyTimeout: the body is not complete after ``timeout`` seconds.
        BadUpload: a ``Content-Length`` that is not a number.
        ClientGone: the client disconnected before the end of its body.
    """
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadUpload(f"Content-Length is not a number: {one_line(declared[:40])}") from None
        if length > limit:
            raise BodyTooLarge(_too_large(limit, f"{length:,} bytes declared"))
    buf = bytearray()

    async def take() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                raise BodyTooLarge(_too_large(limit, f"more than {limit:,} bytes sent"))

    of = f" of {declared}" if declared is not None else ""
    try:
        await asyncio.wait_for(take(), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout(
            f"request body not complete after {timeout:g} s ({len(buf):,}{of} bytes received; "
            "--body-timeout-s)"
        ) from None
    except ClientDisconnect:
        raise ClientGone(f"client disconnected during its upload ({len(buf):,}{of} bytes "
                         "received)") from None  # fmt: skip
    return bytes(buf)


def _too_large(limit: int, what: str) -> str:
    return f"request body too large: {what}, the limit is {limit:,} bytes (--max-body-mb)"


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    def disposition(self) -> dict[str, str]:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self.headers.get("content-disposition", ""))
        return {k.decode("latin-1"): v.decode("utf-8", "replace") for k, v in params.items()}


class _OverLimit(Exception):
    """A multipart body past one of its limits (raised from a parser callback to stop it)."""


def _multipart_parts(body: bytes, content_type: str) -> list[_Part]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload("multipart/form-data body without a boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise BadUpload(f"multipart/form-data boundary of {len(boundary):,} characters (at most "
                        f"{MAX_BOUNDARY}, RFC 2046)")  # fmt: skip
    parts: list[_Part] = []
    name, value = bytearray(), bytearray()

    def on_part_begin() -> None:
        if len(parts) == MAX_PARTS:
            raise _OverLimit(f"more than {MAX_PARTS} parts (one file is expected)")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        name.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except _OverLimit as exc:
        raise BadUpload(f"multipart/form-data body with {exc}") from None
    except FormParserError as exc:
        raise BadUpload(f"malformed multipart/form-data body ({one_line(str(exc))})") from None
    return parts


def image_of(body: bytes, content_type: str) -> tuple[bytes, str]:
    """``(image bytes, name)`` of a request body (see the module doc); the name is the
    client's file name (used for messages and a ``.dcm`` suffix, never as a path) or
    ``upload``.

    Raises:
        BadUpload: a multipart body without a file, or malformed.
    """
    if content_type.lower().startswith("multipart/form-data"):
        parts = _multipart_parts(body, content_type)
        chosen = next((p for p in parts if p.disposition().get("name") == FILE_FIELD), None)
        if chosen is None:
            chosen = next((p for p in parts if "filename" in p.disposition()), None)
        if chosen is None:
            raise BadUpload(
                f"multipart/form-data body without a file: send the image as the field "
                f"'{FILE_FIELD}'"
            )
        filename = chosen.disposition().get("filename") or "upload"
        return bytes(chosen.data), one_line(filename.replace("/", "_").replace("\\", "_"))
    return body, "upload"
