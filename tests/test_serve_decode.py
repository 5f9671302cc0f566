"""``ptxseg serve`` and untrusted uploads (issue 26, items 1, 2, 14): PostScript is refused by
its magic bytes (no Ghostscript, no thread held by a PostScript loop), decompression bombs are
413 from their headers, a DICOM SEG is 422 naming its SOP class; one line each, and the service
goes on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

from fastapi.testclient import TestClient  # noqa: E402

from ptxseg.serve.app import create_app  # noqa: E402
from ptxseg.serve.service import Limits, Service  # noqa: E402
from tests.decode_util import (  # noqa: E402
    POSTSCRIPT_LOOP,
    SEG_SOP_CLASS,
    deflated_dicom_bomb,
    png_bomb,
    postscript,
)
from tests.serve_util import LOCAL, served_run  # noqa: E402

READS = "ptxseg reads PNG, JPEG, TIFF, BMP and DICOM"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    run = served_run(tmp_path_factory.mktemp("serve-decode"))
    service = Service.from_run(run, device="cpu", limits=Limits(max_batch=1))
    with TestClient(create_app(service), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def real_png(sample_dir) -> bytes:
    return sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()


def still_serving(client, png: bytes) -> None:
    ok = client.post("/v1/predict", content=png, params={"images": "false"})
    assert ok.status_code == 200 and ok.json()["width"] == 1024


def one_line(r) -> str:
    detail = r.json()["detail"]
    assert "\n" not in detail
    return detail


def test_postscript_uploads_are_refused_before_any_decoder(client, real_png, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """The issue's EPS as a raw body and as a multipart ``evil.eps``: 400, one line, the file
    it would write not written, Pillow's EPS plugin never asked; a PostScript loop is answered
    at once (it held a worker thread for ever)."""
    from PIL import EpsImagePlugin

    opened = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: opened.append(1) or original(self))  # fmt: skip
    marker = tmp_path / "PWNED"
    body = postscript(marker)
    r = client.post("/v1/predict", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code == 400
    assert one_line(r) == f"upload: not a readable image (PostScript is not read; {READS})"
    r = client.post("/v1/predict", files={"file": ("evil.eps", body, "application/postscript")})
    assert r.status_code == 400
    assert one_line(r) == f"evil.eps: not a readable image (PostScript is not read; {READS})"
    with ThreadPoolExecutor(1) as pool:
        t = time.perf_counter()
        answer = pool.submit(client.post, "/v1/predict", content=POSTSCRIPT_LOOP)
        try:
            r = answer.result(timeout=30)
        except TimeoutError:
            pytest.fail("a PostScript loop still holds the request after 30 s")
    assert r.status_code == 400 and time.perf_counter() - t < 5
    assert not marker.exists() and opened == []
    still_serving(client, real_png)


def test_decompression_bombs_are_413_from_their_headers(client, real_png):
    """A 164 KB PNG of 13000x13000 and a 250 KB deflated DICOM of 16000x16000: 413 within a
    second or two, one line naming the size and the limit; /v1/model says the limit."""
    for name, body, side in (("bomb.png", png_bomb(13000), 13000),
                             ("bomb.dcm", deflated_dicom_bomb(16000), 16000)):  # fmt: skip
        t = time.perf_counter()
        r = client.post("/v1/predict", files={"file": (name, body, "application/octet-stream")})
        assert time.perf_counter() - t < 3
        assert r.status_code == 413, r.text
        from ptxseg.data.imageio import DEFAULT_MAX_PIXELS

        limit = f"above the limit of {DEFAULT_MAX_PIXELS} pixels (PTXSEG_MAX_PIXELS); refused"
        assert one_line(r) == f"{name}: header claims {side}x{side} pixels, {limit}"
    assert client.get("/v1/model").json()["max_pixels"] == DEFAULT_MAX_PIXELS
    still_serving(client, real_png)


def test_a_dicom_seg_upload_is_422_naming_its_sop_class(client, real_png, sample_dir,
                                                         tmp_path):  # fmt: skip
    """A SEG written by ptxseg over a real SIIM DICOM, uploaded: 422 naming its SOP class
    (it was segmented as a chest radiograph: 200, has_pneumothorax true)."""
    from ptxseg.dicomseg import write_dicom_seg

    source = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:700, 200:500] = 1
    seg = write_dicom_seg(source, mask, tmp_path / "seg.dcm")
    r = client.post("/v1/predict", files={"file": ("seg.dcm", Path(seg).read_bytes())})
    assert r.status_code == 422, r.text
    assert one_line(r) == (
        f"seg.dcm: a Segmentation Storage object (SOP Class {SEG_SOP_CLASS}), not a radiograph: "
        "ptxseg reads CR, DX and Secondary Capture images"
    )
    still_serving(client, real_png)
