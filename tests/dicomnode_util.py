"""Helpers of the ``ptxseg dicom-node`` tests: a real Orthanc (Debian's, with its DICOMweb
plugin) started from a temporary configuration on 127.0.0.1 with free ports, ``ptxseg
dicom-node`` in a child process, and readers of what Orthanc stores.

Orthanc, dcmtk's ``storescu`` and dicom3tools' ``dciodvfy`` are Debian packages: the tests
that need them skip where one is absent, except in CI (``PTXSEG_REQUIRE_ORTHANC=1``, set by
``.ci/run``, which installs them), where that is a failure.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import reap, subprocess_env

ORTHANC_AET = "ORTHANC"
MODALITY_AET = "MODALITY"
NODE_AET = "PTXSEG"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: forwards what a modality sends, CR / DX only, to the node; what the node sends back stays
AUTOROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RemoteAet'] == 'PTXSEG' then
    return  -- ptxseg's own results: stored, never sent back
  end
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    SendToModality(instanceId, 'ptxseg')
  end
end
"""


def need(*tools: str) -> dict[str, str]:
    """The paths of Debian tools a test needs (``Orthanc``, ``storescu``...); skip where one is
    missing, fail in CI (``PTXSEG_REQUIRE_ORTHANC=1``)."""
    found, missing = {}, []
    for tool in tools:
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin")
        if path:
            found[tool] = path
        else:
            missing.append(tool)
    if tool_missing := (missing or ([] if DICOMWEB_PLUGIN.exists() or "Orthanc" not in tools
                                    else [str(DICOMWEB_PLUGIN)])):  # fmt: skip
        msg = f"not installed: {', '.join(tool_missing)} (apt-get install orthanc " \
              "orthanc-dicomweb dcmtk dicom3tools)"
        if os.environ.get("PTXSEG_REQUIRE_ORTHANC") == "1":
            pytest.fail(msg + " (PTXSEG_REQUIRE_ORTHANC=1)")
        pytest.skip(msg)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A real Orthanc on 127.0.0.1 (storage in ``root``), with the DICOMweb plugin and, with
    ``lua``, a Lua script; :meth:`stop` kills it (also in a failing test's ``finally``)."""

    def __init__(self, root: Path, *, dicom_port: int | None = None, lua: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "ptxseg-test",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {},
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 8,
            "StableAge": 2,
        }
        if lua is not None:
            (self.root / "route.lua").write_text(lua, encoding="utf-8")
            config["LuaScripts"] = [str(self.root / "route.lua")]
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self) -> Orthanc:
        exe = need("Orthanc")["Orthanc"]
        self.log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([exe, str(self.root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not start: {(self.root / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            reap(self.proc)
            self.proc = None
            self.log.close()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.read()

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def put_modality(self, name: str, aet: str, port: int) -> None:
        body = json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode()
        self.request("PUT", f"/modalities/{name}", body)

    def instance_ids(self) -> list[str]:
        return self.get("/instances")

    def datasets(self) -> list:
        """Every instance Orthanc stores, read by pydicom from its file."""
        import pydicom

        return [pydicom.dcmread(io.BytesIO(self.request("GET", f"/instances/{i}/file")))
                for i in self.instance_ids()]  # fmt: skip

    def by_modality(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for ds in self.datasets():
            out.setdefault(str(ds.Modality), []).append(ds)
        return out

    def count(self) -> int:
        return len(self.instance_ids())


class NodeProcess:
    """``ptxseg dicom-node ARGS`` in a child process (``--port 0``): its port from the first
    line; stderr read on a thread into :attr:`lines`."""

    def __init__(self, args: list[str], cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptxseg", "dicom-node", *args, "--port", "0"], cwd=cwd,
            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.port: int | None = None
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                found = re.search(r"dicom-node \S+ on 127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found.group(1))
                    started.set()
            started.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not started.wait(180) or self.port is None:
            self.stop()
            pytest.fail("ptxseg dicom-node did not start:\n" + "\n".join(self.lines[-30:]))

    def delivered(self) -> list[str]:
        return [line for line in self.lines if " sent to " in line and "latency" in line]

    def stop(self) -> None:
        reap(self.proc)
        self.reader.join(10)

    def text(self) -> str:
        return "\n".join(self.lines)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def storescu(exe: str, port: int, files: list[Path], *, calling: str = MODALITY_AET,
             called: str = NODE_AET, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """dcmtk's storescu: ``files`` to 127.0.0.1:``port`` (proposing JPEG Baseline as well as
    the uncompressed syntaxes: the SIIM files are JPEG)."""
    return subprocess.run([exe, "-xy", "-aet", calling, "-aec", called, *extra, "127.0.0.1",
                           str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def node_run(root: Path) -> Path:
    """The run the node tests serve: :func:`tests.serve_util.served_run`'s (64 px, random
    weights, a rule that removes components under 100 px), without a tuned TTA."""
    from ptxseg.postprocess import PostParams, save_params
    from tests.conftest import make_run

    run = root / "run"
    make_run(run, seed=3)
    save_params(PostParams(binary_threshold=0.5, removal_area=100, size=64),
                run / "thresholds.json")  # fmt: skip
    return run


def content_items(ds):
    """Every SR content item under ``ds`` (depth first), with its concept's code value."""
    for item in ds.get("ContentSequence", []):
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item \
            else None
        yield code, item
        yield from content_items(item)
