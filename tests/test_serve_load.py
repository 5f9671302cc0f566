"""``ptxseg serve`` under load, on a real uvicorn on 127.0.0.1 (a small version of
``benchmarks/serve_load.py``): 24 requests 8 at a time all answered, in micro-batches no larger
than --max-batch, no more requests in the service than --queue; a full queue answers 503 with
Retry-After at once, and the service goes on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

import httpx  # noqa: E402

from ptxseg.serve.app import create_app  # noqa: E402
from ptxseg.serve.service import Limits, Service  # noqa: E402
from tests.serve_util import HeldModel, served_run, uvicorn_server, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return served_run(tmp_path_factory.mktemp("serve-load"))


@pytest.fixture(scope="module")
def bodies(sample_dir) -> list[bytes]:
    pngs = sorted((sample_dir / "png_images").glob("*.png"))[:6]
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))[:2]
    return [p.read_bytes() for p in pngs + dicoms]


def test_24_requests_8_at_a_time(run_dir, bodies):
    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_batch=4, queue=8))
    with uvicorn_server(create_app(service)) as base:
        with httpx.Client(base_url=base, timeout=300) as http, ThreadPoolExecutor(8) as pool:
            def one(i: int) -> httpx.Response:
                return http.post("/v1/predict", content=bodies[i % len(bodies)],
                                 params={"images": "false"})  # fmt: skip

            answers = list(pool.map(one, range(24)))
            health = http.get("/healthz").json()
    assert [r.status_code for r in answers] == [200] * 24
    # the same image gives the same answer whichever batch it ran in (decisive model)
    by_image: dict[int, set[str]] = {}
    for i, r in enumerate(answers):
        by_image.setdefault(i % len(bodies), set()).add(r.json()["rle"])
    assert all(len(rles) == 1 for rles in by_image.values())
    sizes = {int(k): v for k, v in health["batches"].items()}
    assert sum(k * v for k, v in sizes.items()) == 24 and max(sizes) <= 4
    assert health["answered"] == 24 and health["refused_busy"] == 0
    assert health["in_flight"] == 0  # (the queue bound itself: the 503 test below)


def test_a_full_queue_answers_503_with_retry_after(run_dir, bodies):
    """--queue 3 and the model held: of 8 requests at once, 3 are taken and 5 refused at
    once; when the model goes on, the 3 are answered, and so is the next request."""
    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_batch=2, queue=3))
    with uvicorn_server(create_app(service)) as base, httpx.Client(base_url=base,
                                                                    timeout=300) as http:
        with ThreadPoolExecutor(8) as pool, HeldModel(service.batcher) as held:
            futures = [pool.submit(http.post, "/v1/predict", content=bodies[0],
                                   params={"images": "false"}) for _ in range(8)]  # fmt: skip
            wait_until(lambda: sum(f.done() for f in futures) == 5, what="5 refusals")
            wait_until(lambda: held.held + service.batcher.waiting == 3, what="3 at the model")
            assert service.in_flight == 3
            held.release()
            answers = [f.result() for f in futures]
            after = http.post("/v1/predict", content=bodies[1], params={"images": "false"})
            health = http.get("/healthz").json()
    busy = [r for r in answers if r.status_code == 503]
    assert len(busy) == 5 and sum(r.status_code == 200 for r in answers) == 3
    for r in busy:
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"detail": "busy: 3 requests in the service (--queue 3); retry "
                                      "after 1 s"}  # fmt: skip
    assert after.status_code == 200
    assert health["peak_in_flight"] == 3 and health["refused_busy"] == 5
    assert health["answered"] == 4 and health["in_flight"] == 0
