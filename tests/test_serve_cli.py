"""``ptxseg serve`` as a command: the README's lines run (the server in a child process, the
curl calls against it), it listens on 127.0.0.1 by default and stops cleanly on Ctrl+C; a
missing extra, a port in use or a missing run folder is one red line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ptxseg.cli import main
from tests.conftest import REPO, reap

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

from tests.serve_util import served_run, start  # noqa: E402

README = REPO / "README.md"
README_PORT = "127.0.0.1:8000"


def readme_serve_block() -> tuple[str, list[str]]:
    """The README's ``ptxseg serve`` line and its curl lines (```text blocks: not run by
    tests/test_readme.py, whose sandbox would block on a server)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Serving a model over HTTP"):]
    section = section[: section.index("\n## ", 3)]
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```text\n(.*?)```", section, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    serve = [line for line in lines if line.startswith("ptxseg serve ")]
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(serve) == 1 and len(curls) >= 4 and len(serve) + len(curls) == len(lines), lines
    return serve[0], curls


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (Linux /proc/net/tcp)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address if width == 32 else socket.inet_ntoa(
                    bytes.fromhex(address)[::-1]))  # fmt: skip
    return found


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_the_readme_lines_run(tmp_path, sample_dir):
    import highdicom as hd

    serve_line, curls = readme_serve_block()
    runs = tmp_path / "runs"
    runs.mkdir()
    run = served_run(tmp_path / "made")
    args = shlex.split(serve_line)[1:]
    assert args[:2] == ["serve", "runs/siim"]
    (runs / "siim").symlink_to(run)
    png = sorted((sample_dir / "png_images").glob("*_1_.png"))[0]
    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    (tmp_path / "xray.png").symlink_to(png)
    (tmp_path / "image.dcm").symlink_to(dicom)
    proc, url = start([*args, "--port", "0", "--device", "cpu"], tmp_path)
    try:
        host_port = url.removeprefix("http://")
        host, port = host_port.rsplit(":", 1)
        assert host == "127.0.0.1"  # the default
        if os.path.exists("/proc/net/tcp"):
            assert listening_addresses(int(port)) == {"127.0.0.1"}
        outputs = []
        for line in curls:
            cmd = shlex.split(line.replace(README_PORT, host_port))
            done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120)
            assert done.returncode == 0, (line, done.stderr)
            outputs.append(done.stdout)
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["format"] == "PNG" and result["width"] == 1024
        assert set(result) >= {"has_pneumothorax", "max_prob", "area_px", "area_cm2", "rle",
                               "mask_png", "overlay_png", "probability_map"}  # fmt: skip
        lean = json.loads(outputs[1])
        assert "mask_png" not in lean and lean["rle"] == result["rle"]
        seg = hd.seg.segread(tmp_path / "image.seg.dcm")
        assert seg.SegmentationType == "BINARY"
        model = json.loads(outputs[3])
        assert model["tta"] == "hflip" and model["input_size"] == 64
        assert json.loads(outputs[4])["status"] == "ok"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C
        try:
            code = proc.wait(timeout=60)
        finally:
            reap(proc)
    lines = proc.stderr.read().splitlines()
    # Ctrl+C: a graceful stop, no traceback; between the start and "stopped", one line per
    # request (number, method, path, status, seconds, client; what was read)
    assert code == 0 and lines[-1] == "stopped", lines
    assert lines[0] == ("access: this machine only, no token; Host names: 127.0.0.1, "
                        "localhost, [::1]")  # fmt: skip
    access = [re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO #(\d+) (\S+) (\S+) (\d{3}) "
                           r"(\d+\.\d{3}) s 127\.0\.0\.1(?: \| (.*))?", line)
              for line in lines[1:-1]]  # fmt: skip
    assert all(access), lines
    assert [(m[1], m[2], m[3], m[4]) for m in access] == [
        ("1", "POST", "/v1/predict", "200"),
        ("2", "POST", "/v1/predict?images=false", "200"),
        ("3", "POST", "/v1/predict?format=dicom-seg", "200"),
        ("4", "GET", "/v1/model", "200"),
        ("5", "GET", "/healthz", "200"),
    ]
    assert access[0][6] == "xray.png: PNG 1024x1024, " + f"{png.stat().st_size:,} bytes"
    assert access[2][6] == "upload: DICOM 1024x1024, " + f"{dicom.stat().st_size:,} bytes"


def test_a_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ptxseg.serve.EXTRA_MODULES", ("fastapi", "ptxseg_no_such_module"))
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: ptxseg serve needs the serve extra (ptxseg_no_such_module missing): pip "
        "install 'ptxseg[serve]'\n"
    )


def test_a_port_in_use_or_a_missing_run_is_one_line(tmp_path, capsys):
    run = served_run(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen (")
        assert len(err.strip().splitlines()) == 1
    assert main(["serve", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: run folder not found\n"


@pytest.mark.parametrize("reraise", [True, False], ids=["keyboard-interrupt", "plain-return"])
def test_a_stop_is_said_however_uvicorn_returns(tmp_path, capsys, monkeypatch, reraise):
    """uvicorn re-raises a Ctrl+C through asyncio's SIGINT handler, which may or may not end
    in a KeyboardInterrupt in the command (a CI run once saw exit 0 and no "stopped"): both
    ways the command says "stopped" once and exits 0."""
    import uvicorn

    def run(self, sockets=None):
        self.should_exit = True  # what uvicorn's signal handler sets
        if reraise:
            raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn.Server, "run", run)
    run_dir = served_run(tmp_path)
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("serving ")
    assert err.splitlines()[1].startswith("access: ") and err.splitlines()[2:] == ["stopped"]


def test_the_log_escapes_what_uploads_carry_one_line_per_record(tmp_path, sample_dir):
    """``ptxseg serve`` in a child process, its stderr read: a DICOM whose PatientName holds
    ESC, BEL, NUL and CR LF (quoted by pydicom's and highdicom's warnings), a file name with
    an escape sequence, a path with percent-encoded control characters, a client that hangs
    up mid-upload. Not one raw control character reaches the log, no line is forged, the
    disconnect is one line (no traceback), and the text is there, escaped."""
    import httpx
    import pydicom

    evil_name = "EVIL\x1b[31mRED\x07\x00BEL\r\nINFO: forged line"
    ds = pydicom.dcmread(sorted((sample_dir / "dicom").glob("*.dcm"))[0])
    ds.PatientName = evil_name
    dicom = tmp_path / "evil.dcm"
    ds.save_as(dicom)
    png = sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()
    run = served_run(tmp_path)
    proc, url = start(["serve", str(run), "--port", "0", "--device", "cpu"], tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            r = http.post("/v1/predict", content=dicom.read_bytes(),
                          params={"format": "dicom-seg"})  # fmt: skip
            assert r.status_code == 200
            body = (b'--b\r\nContent-Disposition: form-data; name="file"; '
                    b'filename="x\x1b]0;owned\x07.png"\r\n\r\n' + png + b"\r\n--b--\r\n")
            r = http.post("/v1/predict", content=body, params={"images": "false"},
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert r.status_code == 200
            assert http.get("/%1b[2J%0d%0aINFO: forged%00").status_code == 404
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)  # fmt: skip
        time.sleep(1)  # the service notices the hang-up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            reap(proc)
    err = proc.stderr.read()
    raw = re.findall(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", err)
    assert raw == [], raw
    lines = err.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) "
    assert lines[0].startswith("access: ") and lines[-1] == "stopped"
    assert all(re.match(stamp, line) for line in lines[1:-1]), lines
    assert "Traceback" not in err and not any("INFO: forged" in line[:40] for line in lines)
    escaped = r"EVIL\x1b[31mRED\x07\x00BEL\r\nINFO: forged line"
    # pydicom's warnings about the upload go through the same handler, tagged with the
    # request; where one quotes the name (highdicom's did, before the SEG's source values were
    # checked), it is escaped there
    assert any(" WARNING #1 pydicom: " in line for line in lines), "\n".join(lines)
    warned = [line for line in lines if escaped in line]
    assert all(" WARNING #1 " in line for line in warned), "\n".join(lines)
    assert any(line.endswith(r"| x\x1b]0;owned\x07.png: PNG 1024x1024, "
                             f"{len(png):,} bytes") for line in lines), lines  # fmt: skip
    assert any(r"GET /\x1b[2J\r\nINFO: forged\x00 404 " in line for line in lines), lines
    gone = [line for line in lines if "disconnected" in line]
    assert len(gone) == 1 and re.search(
        r" #\d+ POST /v1/predict 499 \d+\.\d{3} s 127\.0\.0\.1 \| client disconnected during "
        r"its upload \(\d[\d,]* of 100000 bytes received\)$", gone[0]), gone  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-body-mb", "inf", "must be a finite number from 0.001 to 2000 MB (got inf)"),
        ("--max-body-mb", "1e400", "must be a finite number from 0.001 to 2000 MB (got inf)"),
        ("--max-body-mb", "nan", "must be a finite number from 0.001 to 2000 MB (got nan)"),
        ("--max-body-mb", "0", "must be a finite number from 0.001 to 2000 MB (got 0.0)"),
        ("--batch-wait-ms", "inf", "must be a finite number from 0 to 10000 ms (got inf)"),
        ("--batch-wait-ms", "-1", "must be a finite number from 0 to 10000 ms (got -1.0)"),
        ("--body-timeout-s", "1e400", "must be a finite number from 0.1 to 3600 s (got inf)"),
        ("--queue", "0", "must be a whole number from 1 to 100000 requests (got 0)"),
        ("--max-batch", "100000", "must be a whole number from 1 to 1024 images (got 100000)"),
        ("--max-uploads", "0", "must be a whole number from 1 to 100000 requests (got 0)"),
        ("--port", "70000", "must be a whole number from 0 to 65535 (got 70000)"),
    ],
)  # fmt: skip
def test_every_numeric_option_is_checked_in_one_line(tmp_path, capsys, monkeypatch, option,
                                                     value, message):  # fmt: skip
    """Refused before the model loads or the port opens (an infinite --batch-wait-ms killed
    the model thread; an infinite --max-body-mb gave a traceback)."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    run = served_run(tmp_path)
    # (--port 0 first: a later --port wins)
    assert main(["serve", str(run), "--device", "cpu", "--port", "0", option, value]) == 2
    assert capsys.readouterr().err == f"error: {option}: {message}\n"


def test_an_ensemble_says_so(tmp_path, capsys, monkeypatch):
    """Two runs given with --model are served as one ensemble: the first line and /v1/model
    say how many members and how they combine."""
    import uvicorn
    from fastapi.testclient import TestClient

    from tests.conftest import make_run
    from tests.serve_util import LOCAL

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(
        self.config.app))  # fmt: skip
    run = served_run(tmp_path)
    other = tmp_path / "other"
    make_run(other, seed=5)
    assert main(["serve", str(run), "--model", str(run), "--model", str(other), "--port", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"serving {run} (a 2-member ensemble (mean probability) of "
                            "unet/efficientnet-b0, 64 px, tta hflip, cpu; rule ")  # fmt: skip
    with TestClient(served[0], base_url=LOCAL) as client:
        model = client.get("/v1/model").json()
    assert model["ensemble_size"] == 2 and model["combine"] == "mean probability"
    assert model["members"] == ["run/best.ckpt", "other/best.ckpt"]
