"""Helpers of the ``ptxseg serve`` tests: a real uvicorn on 127.0.0.1 in a thread, ``ptxseg
serve`` in a child process, a served run, a model that can be held (to fill the queue at
will)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import reap, subprocess_env

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

#: the base URL of FastAPI's TestClient in these tests: a Host name the service allows
LOCAL = "http://127.0.0.1"


def served_run(root: Path, *, removal_area: int = 100, tta: str | None = "hflip") -> Path:
    """A run folder (:func:`tests.conftest.make_run`, 64 px, random weights of seed 3) with a
    thresholds.json that removes components (the area scaling of the native-size rule is
    exercised, and on the real sample some images come out negative: their largest component
    is under 100 px at 64 px) and records the test-time augmentation it was tuned with."""
    from ptxseg.postprocess import PostParams, save_params
    from tests.conftest import make_run

    run = root / "run"
    make_run(run, seed=3)
    extra = {"tta": tta} if tta else {}
    save_params(PostParams(binary_threshold=0.5, removal_area=removal_area, size=64),
                run / "thresholds.json", extra=extra)  # fmt: skip
    return run


def start(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """``ptxseg serve ...`` in a child process (``env``: extra environment variables); returns
    it and the URL its first line gives."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptxseg", *args], cwd=cwd, env=subprocess_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"on (http://\S+?)/ ", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    reap(proc)
    pytest.fail(f"ptxseg serve did not start: {line!r} {proc.stderr.read()}")


@contextlib.contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL
    and stops it at the end."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            access_log=False, lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


class HeldModel:
    """Wraps a batcher's ``run_batch``: every batch waits until :meth:`release` (then runs
    normally); ``held`` counts the images of the batch waiting at the gate. A context
    manager that releases on exit (a failing test never leaves the server blocked)."""

    def __init__(self, batcher):
        self.batcher = batcher
        self.run = batcher.run_batch
        self.gate = threading.Event()
        self.held = 0
        batcher.run_batch = self

    def __call__(self, x):
        if not self.gate.is_set():
            self.held = len(x)
        assert self.gate.wait(60), "the test never released the model"
        return self.run(x)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self.gate.set()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
