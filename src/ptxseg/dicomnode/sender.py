"""Where the node's results go: a DICOM C-STORE SCP (``--send-to AET@HOST:PORT``, a pynetdicom
SCU) or a DICOMweb STOW-RS endpoint (``--stow URL``, dicomweb-client), and the back-off
between attempts while it is down.

A :class:`Destination` opens a session (one association; one HTTP client) and sends result
files through it; any failure (no connection, association rejected or aborted, a failure
status, an HTTP error) is a :class:`SendError`. Warning statuses (``0xB000``, ``0xB006``,
``0xB007``: stored with coercion) count as stored.

:class:`Backoff`: the delay before the next attempt doubles from ``first_s`` up to ``max_s``
after each failure and is reset by a success; the node retries for as long as it runs, the
results waiting in the spool (never dropped).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ptxseg.errors import ConfigError

#: C-STORE statuses that mean "stored" (success, and the warnings of PS3.4 B.2.3)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_TARGET = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>[0-9]{1,5})")


class SendError(Exception):
    """A result not stored by the destination (the reason, one line)."""


@dataclass(frozen=True)
class Backoff:
    """The delay before attempt ``n + 1`` after ``n`` failures in a row: ``first_s * 2 ** (n
    - 1)``, at most ``max_s``."""

    first_s: float = 2.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ConfigError(f"--retry-max-s: must be at least {self.first_s:g} s "
                              f"(got {self.max_s:g})")  # fmt: skip

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.first_s * 2.0 ** min(failures - 1, 30))


class DicomDestination:
    """A C-STORE SCP: ``AET@HOST:PORT``, called as ``calling_aet``."""

    def __init__(self, target: str, calling_aet: str, *, timeout_s: float = 30.0):
        found = _TARGET.fullmatch(target.strip())
        if not found or not 0 < int(found["port"]) < 65536:
            raise ConfigError(f"--send-to: {target!r} is not AET@HOST:PORT")
        self.ae_title = found["aet"]
        self.host = found["host"].strip("[]")
        self.port = int(found["port"])
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.description = f"{self.ae_title}@{found['host']}:{self.port}"

    @contextlib.contextmanager
    def session(self) -> Iterator[_DicomSession]:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for uid in (SEG_STORAGE, COMPREHENSIVE_SR_STORAGE, SC_STORAGE):
            ae.add_requested_context(uid, [_EXPLICIT_LE, _IMPLICIT_LE])
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        except Exception as exc:  # noqa: BLE001 - socket errors of every kind
            raise SendError(f"{self.description}: cannot connect ({exc})") from None
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected
                   else "association aborted" if assoc.is_aborted
                   else "no connection")  # fmt: skip
            raise SendError(f"{self.description}: {why}")
        try:
            yield _DicomSession(assoc, self.description)
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()


class _DicomSession:
    def __init__(self, assoc, description: str):
        self.assoc = assoc
        self.description = description

    def send(self, path: Path) -> None:
        from ptxseg.data.imageio import read_dicom_object

        ds = read_dicom_object(path)
        try:
            answer = self.assoc.send_c_store(ds)
        except Exception as exc:  # noqa: BLE001 - no context, aborted association...
            raise SendError(f"{self.description}: C-STORE failed ({exc})") from None
        code = int(answer.get("Status", -1)) if answer is not None and len(answer) else None
        if code is None:
            raise SendError(f"{self.description}: no C-STORE answer (connection lost or timed out)")
        if code not in STORED:
            comment = str(answer.get("ErrorComment", "") or "")
            raise SendError(f"{self.description}: C-STORE status 0x{code:04X}"
                            + (f" ({comment})" if comment else ""))  # fmt: skip


class StowDestination:
    """A DICOMweb STOW-RS endpoint (the service's root URL, e.g. Orthanc's
    ``http://host:8042/dicom-web``)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0):
        if not re.match(r"https?://[^/\s]+", url.strip()):
            raise ConfigError(f"--stow: {url!r} is not an http(s) URL")
        self.url = url.strip().rstrip("/")
        self.timeout_s = timeout_s
        self.description = self.url

    @contextlib.contextmanager
    def session(self) -> Iterator[_StowSession]:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=self.url)
        yield _StowSession(client, self.description, self.timeout_s)


class _StowSession:
    def __init__(self, client, description: str, timeout_s: float):
        self.client = client
        self.description = description
        self.timeout_s = timeout_s

    def send(self, path: Path) -> None:
        from ptxseg.data.imageio import read_dicom_object

        ds = read_dicom_object(path)
        try:
            self.client.store_instances([ds])
        except Exception as exc:  # noqa: BLE001 - requests' and the client's errors alike
            raise SendError(f"{self.description}: STOW-RS failed ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None  # fmt: skip
