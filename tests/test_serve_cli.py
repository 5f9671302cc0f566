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
    err = proc.stderr.read()
    assert code == 0 and err == "stopped\n", err  # Ctrl+C: a graceful stop, no traceback


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
    assert err.splitlines()[1:] == ["stopped"]
