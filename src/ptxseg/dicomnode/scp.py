"""The node's service class provider: C-ECHO and C-STORE (pynetdicom), who may call it, and
the DIMSE status of every refusal.

**What is accepted.** Presentation contexts are accepted for CR Image Storage, Digital X-Ray
Image Storage - For Presentation and Secondary Capture Image Storage (SIIM-ACR and many
anonymised collections hold their radiographs as Secondary Capture of modality CR), in the
uncompressed transfer syntaxes and the compressed ones an installed pydicom decoder reads
(:func:`transfer_syntaxes`). Every other SOP class (an SR, a SEG, a CT, a DX For Processing,
whose pixels are not meant for display) is refused at association: its presentation context
is rejected as "abstract syntax not supported" (PS3.8 9.3.3.2), the standard answer of a
C-STORE SCP to a SOP class it does not serve, so no data set is sent. A sender that proposes
it alone gets an association without a usable context (storescu: "No presentation context
for: ...", Orthanc's store job fails).

**Who may call.** ``allow``: the calling AE titles accepted; any other is rejected at
association (A-ASSOCIATE-RJ, "calling AE title not recognised"). The called AE title must be
the node's. TLS: an :class:`ssl.SSLContext` wraps every association (:func:`tls_context`).

**C-STORE statuses** (with an Error Comment (0000,0902) giving the one-line reason):

===========  ===================================================================
``0x0000``   written to the spool (fsync'd): it will be segmented and answered
``0x0122``   a Secondary Capture of another modality than CR / DX (not a radiograph)
``0xA900``   the data set's SOP Class UID is not the presentation context's
``0xC000``   cannot be read: truncated, corrupt, an invalid SOP Instance UID
``0xC001``   reads but cannot be used: no pixel data, pixel data no installed decoder
             reads, a header claiming more pixels than the limit (decoded nothing)
``0xA700``   the spool cannot be written (full disk): nothing was kept
``0x0110``   anything else went wrong in the node: nothing was kept
===========  ===================================================================

Every instance is decoded before it is acknowledged (:func:`ptxseg.data.imageio.read_image_bytes`,
predict's decoders and limits), so a success status means the image will be segmented, and
a hostile data set is refused on the spot, the node serving on.

**C-ECHO**: ``0x0000`` while the node works (its worker and sender threads alive, the spool
writable), else ``0x0110``: a monitor's ``echoscu`` is the node's health check.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ptxseg.errors import ConfigError, DataError

log = logging.getLogger("ptxseg.dicomnode")

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
#: the storage SOP classes accepted (see the module doc)
ACCEPTED_SOP_CLASSES = {
    CR_STORAGE: "CR Image Storage",
    DX_PRESENTATION_STORAGE: "Digital X-Ray Image Storage - For Presentation",
    SC_STORAGE: "Secondary Capture Image Storage",
}
#: the modalities a Secondary Capture must have to be segmented
RADIOGRAPH_MODALITIES = ("CR", "DX")

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNUSABLE_IMAGE = 0xC001

_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
)


class Refused(Exception):
    """An instance the node does not keep: ``status`` is the DIMSE status to answer,
    ``comment`` the problem (the Error Comment: the instance is the request's)."""

    def __init__(self, status: int, comment: str):
        self.status, self.comment = status, comment
        super().__init__(f"0x{status:04X}: {comment}")


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes accepted: uncompressed, then every compressed one for which an
    installed pydicom pixel decoder is available (Pillow: JPEG Baseline, the SIIM-ACR
    files' syntax)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    out = list(_UNCOMPRESSED)
    for uid in AllTransferSyntaxes:
        if uid in out or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(str(uid))
        except (NotImplementedError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class Tls:
    """TLS of the listening side: the node's certificate and key (PEM) and, to require a
    client certificate, the CA that signs them."""

    cert: Path
    key: Path
    ca: Path | None = None


def tls_context(tls: Tls) -> ssl.SSLContext:
    """A server :class:`ssl.SSLContext` (TLS 1.2 at least; client certificates required when
    a CA is given).

    Raises:
        ConfigError: a certificate, key or CA file that cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{tls.cert}: cannot load the TLS certificate and key ({exc})") from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{tls.ca}: cannot load the TLS CA ({exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_instance(data: bytes, request_uid: str, sop_class: str):
    """Decode one received instance (file meta + data set) as predict reads a file, and check
    that the node segments it.

    Returns:
        ``(key, decoded)``: the SOP Instance UID (the spool key) and the
        :class:`~ptxseg.data.imageio.DecodedImage`.

    Raises:
        Refused: with the status to answer (see the module doc).
    """
    from ptxseg.data.imageio import UnsupportedImage, read_image_bytes
    from ptxseg.dicomnode.spool import check_uid

    try:
        key = check_uid(request_uid)
    except DataError as exc:
        raise Refused(CANNOT_UNDERSTAND, f"SOP Instance UID {exc.problem}") from None
    try:
        decoded = read_image_bytes(data, f"{key}.dcm")
    except UnsupportedImage as exc:
        raise Refused(UNUSABLE_IMAGE, exc.problem) from None
    except DataError as exc:
        raise Refused(CANNOT_UNDERSTAND, exc.problem) from None
    except Exception as exc:  # noqa: BLE001 - a decoder's own failure is the data set's
        raise Refused(CANNOT_UNDERSTAND, f"cannot read ({type(exc).__name__})") from None
    ds = decoded.dataset
    if ds is None:
        raise Refused(CANNOT_UNDERSTAND, "not a DICOM data set")
    if str(ds.get("SOPInstanceUID", "")).strip() != key:
        raise Refused(CANNOT_UNDERSTAND,
                      "its SOP Instance UID differs from the request's")  # fmt: skip
    if str(ds.get("SOPClassUID", "")).strip() != sop_class:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS,
                      "its SOP Class UID is not the presentation context's "
                      f"({ACCEPTED_SOP_CLASSES.get(sop_class, sop_class)})")  # fmt: skip
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class == SC_STORAGE and modality not in RADIOGRAPH_MODALITIES:
        raise Refused(SOP_CLASS_NOT_SUPPORTED,
                      f"a Secondary Capture of modality {modality or 'none'}; "
                      f"only {' and '.join(RADIOGRAPH_MODALITIES)} radiographs are segmented")
    return key, decoded


def status(code: int, comment: str = ""):
    """A C-STORE / C-ECHO response status data set (with its Error Comment)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:64]
    return ds


def build_ae(ae_title: str, allow: Sequence[str], on_store: Callable, on_echo: Callable):
    """The pynetdicom application entity of the node and its event handlers."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    if allow:
        ae.require_calling_aet = list(allow)
    syntaxes = transfer_syntaxes()
    for uid in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(uid, syntaxes)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)]
    return ae, handlers


def check_ae_title(value: str, option: str) -> str:
    """An AE title (1 to 16 characters of printable ASCII, no backslash) or a ConfigError."""
    title = value.strip()
    if not (0 < len(title) <= 16 and title.isascii() and title.isprintable() and "\\" not in title):
        raise ConfigError(f"{option}: {value!r} is not an AE title (1 to 16 ASCII characters)")
    return title
