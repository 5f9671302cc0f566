"""Who may talk to ``ptxseg dicom-node``: TLS (a self-signed certificate made here), the
C-ECHO health answer, and the command line's refusals (a node beyond this machine without
``--allow``, a bad destination, no destination), each one line and exit code 2.
"""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from tests.conftest import run_bounded
from tests.dicomnode_util import NODE_AET, free_port, need, node_run

pynetdicom = pytest.importorskip("pynetdicom", reason="ptxseg dicom-node needs its extra")

VERIFICATION = "1.2.840.10008.1.1"


def _echo(port: int, ssl_context=None, calling: str = "MONITOR"):
    """``(established, status)`` of a C-ECHO to the node."""
    ae = pynetdicom.AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    tls = (ssl_context, "localhost") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=tls)
    if not assoc.is_established:
        return False, None
    try:
        answer = assoc.send_c_echo()
        return True, int(answer.Status) if answer is not None and "Status" in answer else None
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for ``localhost`` and its key (openssl)."""
    openssl = need("openssl")["openssl"]
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "node.pem", root / "node.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def node_over_tls(tmp_path_factory, certificate):
    """A node of a tiny run, in this process, listening with TLS."""
    from ptxseg.dicomnode.node import Options, load
    from ptxseg.dicomnode.scp import Tls
    from ptxseg.dicomnode.sender import DicomDestination

    root = tmp_path_factory.mktemp("tls_node")
    cert, key = certificate
    options = Options(ae_title=NODE_AET, port=0, tls=Tls(cert, key))
    destination = DicomDestination(f"NOWHERE@127.0.0.1:{free_port()}", NODE_AET)
    node = load(node_run(root), spool=root / "spool", destination=destination, options=options,
                device="cpu")  # fmt: skip
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_tls_associations_are_answered_and_plain_ones_are_not(node_over_tls, certificate):
    cert, _ = certificate
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assert _echo(node_over_tls.port, client) == (True, 0x0000)
    assert _echo(node_over_tls.port) == (False, None)  # plain text to a TLS port
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system CAs only
    assert _echo(node_over_tls.port, untrusting) == (False, None)


def test_echo_is_the_health_check(node_over_tls, certificate):
    cert, _ = certificate
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assert node_over_tls.healthy()
    node_over_tls._stopping.set()  # the worker and the sender stop; the listener stays
    for thread in node_over_tls._threads:
        thread.join(30)
    assert _echo(node_over_tls.port, client) == (True, 0x0110)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0: a node listening beyond this machine needs"),
        (["--send-to", "PACS@host"], "--send-to: 'PACS@host' is not AET@HOST:PORT"),
        (["--send-to", None], "--send-to / --stow: give exactly one destination"),
        (["--ae-title", "A" * 17], "--ae-title: 'AAAAAAAAAAAAAAAAA' is not an AE title"),
        (["--tls-cert", "c.pem"], "--tls-cert / --tls-key: TLS needs both"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_in_one_line(tmp_path, args, message):
    base = ["--spool", str(tmp_path / "spool"), "--send-to", "PACS@127.0.0.1:4242"]
    if args[:2] == ["--send-to", None]:
        base, args = ["--spool", str(tmp_path / "spool")], []
    out = run_bounded([sys.executable, "-m", "ptxseg", "dicom-node", str(tmp_path / "run"),
                       *base, *args], 120, "ptxseg dicom-node")  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "spool").exists()


def test_a_second_node_on_the_same_spool_is_refused(node_over_tls):
    from ptxseg.dicomnode.node import Node, Options
    from ptxseg.dicomnode.spool import Spool
    from ptxseg.errors import PtxsegError

    node = node_over_tls
    other = Node(node.predictor, node.rule, node.algorithm, Spool(node.spool.root),
                 node.destination, Options(ae_title=NODE_AET, port=0))  # fmt: skip
    with pytest.raises(PtxsegError, match="spool in use by another node"):
        other.start()
    assert other.port is None
