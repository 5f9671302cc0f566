"""``ptxseg serve`` against hostile and broken clients (issue 26), over real sockets on a real
uvicorn: slow bodies (slowloris) hold no queue place and are closed after their time limit;
a multipart body of 900,000 parts is refused without stalling the event loop; a model worker
that dies is reported (``/healthz`` 503) and fails requests at once instead of hanging them;
a number that is not finite never turns an answer into a 500."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from ptxseg.serve.app import create_app  # noqa: E402
from ptxseg.serve.service import Limits, Service, finite_json  # noqa: E402
from tests.serve_util import LOCAL, served_run, uvicorn_server, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return served_run(tmp_path_factory.mktemp("serve-hostile"))


@pytest.fixture(scope="module")
def png(sample_dir) -> bytes:
    return sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()


def slow_client(base: str, declared: int = 100_000) -> socket.socket:
    """A connection that sends a request's headers (``Content-Length: declared``) and one
    byte of its body, then idles."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Content-Length: %d\r\n\r\nx" % declared)  # fmt: skip
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data


def test_slow_bodies_hold_no_queue_place_and_are_closed_after_their_limit(run_dir, png):
    """20 clients send headers declaring 100,000 bytes and 1 byte, then idle (slowloris; the
    queue has 16 places): a normal request is still answered at once; a client past
    --max-uploads is refused 503 at once; each slow one gets 408 and its connection closed
    after --body-timeout-s (4 s here), not later."""
    limits = Limits(max_batch=1, body_timeout_s=4.0, max_uploads=21)
    service = Service.from_run(run_dir, device="cpu", limits=limits)
    assert service.queue == 16
    with uvicorn_server(create_app(service)) as base, httpx.Client(base_url=base,
                                                                    timeout=60) as http:
        http.post("/v1/predict", content=png, params={"images": "false"})  # warm the model
        t0 = time.monotonic()
        slow, late = [slow_client(base) for _ in range(20)], []
        try:
            wait_until(lambda: service.uploading == 20, timeout=10, what="20 slow uploads")
            started = time.monotonic()
            ok = http.post("/v1/predict", content=png, params={"images": "false"})
            took = time.monotonic() - started
            assert ok.status_code == 200 and ok.json()["width"] == 1024, ok.text
            assert took < 3.0, took
            assert service.uploading == 20  # answered while the 20 idle, not after their limit
            late = [slow_client(base), slow_client(base)]  # the 21st place, then one too many
            wait_until(lambda: service.refused_uploads == 1, timeout=5, what="a 503")
            late[1].settimeout(5)
            refused = late[1].recv(65536)
            assert refused.startswith(b"HTTP/1.1 503"), refused[:200]
            assert b"--max-uploads 21" in refused and b"retry-after: 1" in refused.lower()
            with ThreadPoolExecutor(len(slow) + 1) as pool:
                answers = list(pool.map(read_until_closed, [*slow, late[0]]))
            closed_after = time.monotonic() - t0
        finally:
            for sock in slow + late:
                sock.close()
        health = http.get("/healthz").json()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
        assert detail == ("request body not complete after 4 s (1 of 100000 bytes received; "
                          "--body-timeout-s)")  # fmt: skip
    assert 4.0 <= closed_after < 4.0 + 6.0, closed_after
    assert health["slow_bodies"] == 21 and health["uploading"] == 0
    assert health["in_flight"] == 0 and health["refused_busy"] == 0  # no queue place taken


def multipart_bomb(n_parts: int) -> tuple[bytes, str]:
    """A multipart body of ``n_parts`` tiny fields (about 52 bytes each) and its type."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    return part * n_parts + b"--b--\r\n", "multipart/form-data; boundary=b"


def test_900000_multipart_parts_are_refused_without_stalling_the_loop(run_dir):
    """A 46.8 MB body of 900,000 tiny parts (under the 50 MB limit): /healthz, asked every
    50 ms meanwhile, answers each time within 1 s, and the request gets a one-line 400."""
    body, kind = multipart_bomb(900_000)
    assert 45e6 < len(body) < 50e6
    service = Service.from_run(run_dir, device="cpu")
    latencies: list[float] = []
    done = threading.Event()
    with uvicorn_server(create_app(service)) as base, httpx.Client(base_url=base,
                                                                    timeout=120) as http:
        def probe() -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                while not done.is_set():
                    t = time.monotonic()
                    assert own.get("/healthz").status_code == 200
                    latencies.append(time.monotonic() - t)
                    time.sleep(0.05)

        with ThreadPoolExecutor(1) as pool:
            prober = pool.submit(probe)
            try:
                r = http.post("/v1/predict", content=body, headers={"Content-Type": kind})
                time.sleep(0.3)  # the loop after the answer too
            finally:
                done.set()
            prober.result()
    assert r.status_code == 400
    assert r.json() == {"detail": "multipart/form-data body with more than 16 parts (one file "
                                  "is expected)"}  # fmt: skip
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_a_5000_character_boundary_is_one_line_400(run_dir):
    """python-multipart refuses a boundary over 256 characters with an error of its own (a 500
    before); RFC 2046 allows 70: one 400 line, and the service goes on."""
    service = Service.from_run(run_dir, device="cpu")
    with TestClient(create_app(service), base_url=LOCAL) as client:
        r = client.post("/v1/predict", content=b"--" + b"x" * 5000 + b"\r\n",
                        headers={"Content-Type": "multipart/form-data; boundary=" + "x" * 5000})
        assert r.status_code == 400
        assert r.json() == {"detail": "multipart/form-data boundary of 5,000 characters (at "
                                      "most 70, RFC 2046)"}  # fmt: skip
        assert client.get("/healthz").json()["in_flight"] == 0


def test_a_dead_model_worker_is_unhealthy_and_requests_fail_at_once(run_dir, png):
    """The worker thread stopped by an error outside the model (an infinite batch wait, as
    `--batch-wait-ms inf` did): the request it held fails at once (503), /healthz answers
    503 with the reason, and later requests are refused before their body is read."""
    service = Service.from_run(run_dir, device="cpu")
    with uvicorn_server(create_app(service)) as base, httpx.Client(base_url=base,
                                                                    timeout=30) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        service.batcher.max_wait_s = math.inf  # what the option check now refuses
        started = time.monotonic()
        first = http.post("/v1/predict", content=png, params={"images": "false"})
        assert time.monotonic() - started < 10
        assert first.status_code == 503, first.text
        # (OverflowError's text depends on the platform: "timeout value is too large" ...)
        detail = first.json()["detail"]
        assert detail.startswith("the model worker has stopped (OverflowError: ")
        assert detail.endswith("): the service cannot answer; restart it")
        health = http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "dead"
        assert health.json()["worker"].startswith("stopped (OverflowError: ")
        again = http.post("/v1/predict", content=png)
        assert again.status_code == 503 and "retry-after" not in again.headers
        assert again.json()["detail"].startswith("the model worker has stopped (OverflowError")
        assert service.uploading == 0 and service.in_flight == 0


def test_numbers_that_are_not_finite_never_give_a_500_of_the_json_encoder(run_dir, png, sample_dir):
    """An absurd PixelSpacing (1e200 mm: an area of inf cm2 before the spacing was judged
    implausible) answers 200 with no area in cm2; a NaN probability (a broken model) answers a
    one-line 500 that names it. Either way the body is JSON any parser reads (no NaN or
    Infinity token), never the encoder's "Out of range float values" error."""
    import io

    import pydicom

    service = Service.from_run(run_dir, device="cpu")
    run = service.batcher.run_batch

    def nan_at_a_corner(x):
        probs = run(x).copy()
        probs[:, 0, 0] = np.nan
        return probs

    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    ds = pydicom.dcmread(dicom)
    ds.PixelSpacing = [1e200, 1e200]
    buf = io.BytesIO()
    ds.save_as(buf)
    with TestClient(create_app(service), base_url=LOCAL) as client:
        absurd = client.post("/v1/predict", content=buf.getvalue(), params={"images": "false"})
        assert absurd.status_code == 200, absurd.text
        json.loads(absurd.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
        assert absurd.json()["area_cm2"] is None and absurd.json()["area_px"] > 0
        service.batcher.run_batch = nan_at_a_corner
        r = client.post("/v1/predict", content=png, params={"images": "false"})
    assert r.status_code == 500, r.text
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert "not finite" in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_finite_json_names_what_it_empties():
    answer = {"a": 1.5, "b": math.inf, "c": [1.0, -math.inf, {"d": math.nan}], "e": "x",
              "f": np.float32("nan"), "g": np.float64(2.5)}  # fmt: skip
    assert finite_json(answer) == {
        "a": 1.5, "b": None, "c": [1.0, None, {"d": None, "not_finite": {"d": "nan"}}],
        "e": "x", "f": None, "g": 2.5, "not_finite": {"b": "inf", "f": "nan"},
    }  # fmt: skip
