"""``ptxseg serve`` (issue 15): the API on the real SIIM sample, in process (FastAPI's
TestClient) and over a real uvicorn on 127.0.0.1; its masks are ``ptxseg predict``'s; every
bad input is a one-line 400/413/415/422 and the service keeps serving."""

from __future__ import annotations

import base64
import csv
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from ptxseg.data.rle import decode  # noqa: E402
from ptxseg.serve.app import create_app  # noqa: E402
from ptxseg.serve.service import Limits, Service  # noqa: E402
from tests.serve_util import (  # noqa: E402
    LOCAL,
    HeldModel,
    served_run,
    uvicorn_server,
    wait_until,
)


def visible_text(page: str) -> str:
    """The text a person sees on an HTML page (outside script and style)."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.hidden = [], 0

        def handle_starttag(self, tag, attrs):
            self.hidden += tag in ("script", "style")

        def handle_endtag(self, tag):
            self.hidden -= tag in ("script", "style")

        def handle_data(self, data):
            if not self.hidden:
                self.parts.append(data)

    parser = Text()
    parser.feed(page)
    return "".join(parser.parts)


def png_of(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return served_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def images(sample_dir) -> list[Path]:
    """Real radiographs: 3 positive and 3 negative SIIM PNGs, 4 SIIM DICOMs (JPEG baseline)."""
    pngs = sorted((sample_dir / "png_images").glob("*.png"))
    positives = [p for p in pngs if p.name.endswith("_1_.png")][:3]
    negatives = [p for p in pngs if p.name.endswith("_0_.png")][:3]
    dicoms = sorted((sample_dir / "dicom").glob("*.dcm"))[:4]
    return positives + negatives + dicoms


@pytest.fixture(scope="module")
def predicted(run_dir, images, tmp_path_factory) -> dict[str, dict]:
    """``ptxseg predict`` of the same images with the same run (one image per batch, as the
    service with --max-batch 1): source -> its results.csv row and mask."""
    from ptxseg.predict import predict

    out = tmp_path_factory.mktemp("predicted") / "out"
    predict(run_dir, images, out, tta="hflip", batch_size=1, workers=0, device="cpu",
            dicom_seg=True, progress=False)  # fmt: skip
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["mask"] = cv2.imread(str(out / "masks" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        row["seg"] = out / row["dicom_seg"] if row.get("dicom_seg") else None
    return {row["source"]: row for row in rows}


@pytest.fixture(scope="module")
def client(run_dir):
    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_batch=1))
    with TestClient(create_app(service), base_url=LOCAL) as c:
        yield c


def post(client, path: Path, **params):
    """Raw body for PNGs, multipart for DICOMs: both ways in are used."""
    if path.suffix == ".dcm":
        files = {"file": (path.name, path.read_bytes(), "application/dicom")}
        return client.post("/v1/predict", files=files, params=params)
    return client.post("/v1/predict", content=path.read_bytes(), params=params,
                       headers={"Content-Type": "image/png"})  # fmt: skip


def test_masks_equal_predicts_on_the_real_sample(client, images, predicted):
    n_positive = 0
    for path in images:
        r = post(client, path)
        assert r.status_code == 200, r.text
        out = r.json()
        row = predicted[str(path)]
        expected = row["mask"]
        assert (out["height"], out["width"]) == expected.shape == (1024, 1024)
        np.testing.assert_array_equal(png_of(out["mask_png"]), expected)
        np.testing.assert_array_equal(decode(out["rle"], 1024, 1024) * 255, expected)
        assert out["area_px"] == int(row["area_px"]) == int(np.count_nonzero(expected))
        assert out["has_pneumothorax"] == (row["has_pneumothorax"] == "1")
        assert abs(out["max_prob"] - float(row["max_prob"])) <= 5e-7
        assert out["format"] == ("DICOM" if path.suffix == ".dcm" else "PNG")
        n_positive += out["has_pneumothorax"]
        overlay = png_of(out["overlay_png"])
        assert overlay.ndim == 3 and overlay.shape[1] == 1024  # caption bar under the image
        pmap = png_of(out["probability_map"]["png"])
        assert pmap.shape == (256, 256) and pmap.dtype == np.uint8
        assert png_of(out["preview_png"]).shape == (512, 512)
    assert 0 < n_positive < len(images)  # both kinds of answer were compared


def test_measures_use_the_dicom_spacing(client, images):
    import pydicom

    dicom = next(p for p in images if p.suffix == ".dcm")
    out = post(client, dicom, images="false").json()
    assert "mask_png" not in out and "overlay_png" not in out  # images=false
    spacing = [float(v) for v in pydicom.dcmread(dicom, stop_before_pixels=True).PixelSpacing]
    assert out["area_note"].startswith(f"from PixelSpacing {spacing[0]:g} x {spacing[1]:g} mm")
    assert out["area_cm2"] == pytest.approx(out["area_px"] * spacing[0] * spacing[1] / 100)
    png = next(p for p in images if p.suffix == ".png")
    out = post(client, png, images="false").json()
    assert out["area_cm2"] is None
    assert out["area_note"] == "no pixel spacing (PNG image, not DICOM)"


def test_dicom_seg_of_a_real_dicom(client, images, predicted):
    import highdicom as hd
    import pydicom
    from pydicom.uid import SegmentationStorage

    dicom = next(p for p in images if p.suffix == ".dcm")
    r = post(client, dicom, format="dicom-seg")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(r.content))
    src = pydicom.dcmread(dicom, stop_before_pixels=True)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    pixels = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0] * 255, predicted[str(dicom)]["mask"])
    algo = seg.get_segment_description(1).algorithm_identification[0]
    assert "run=run" in algo.AlgorithmParameters and "tta=hflip" in algo.AlgorithmParameters
    # the model is identified as predict identifies it (run, checkpoint SHA-256, TTA, rule)
    theirs = hd.seg.segread(predicted[str(dicom)]["seg"])
    their_algo = theirs.get_segment_description(1).algorithm_identification[0]
    for key in ("AlgorithmName", "AlgorithmVersion", "AlgorithmParameters"):
        assert getattr(algo, key) == getattr(their_algo, key), key
    png = next(p for p in images if p.suffix == ".png")
    r = post(client, png, format="dicom-seg")
    assert r.status_code == 415
    assert r.json() == {"detail": "format=dicom-seg needs a DICOM upload (got a PNG image)"}


def test_model_health_and_docs(client, run_dir):
    from ptxseg import __version__

    model = client.get("/v1/model").json()
    saved = json.loads((run_dir / "thresholds.json").read_text())
    assert model["run"] == "run" and model["architecture"] == "unet"
    assert model["encoder"] == "efficientnet-b0" and model["input_size"] == 64
    assert model["thresholds"] == {k: saved[k] for k in model["thresholds"]}
    assert model["thresholds"]["removal_area"] == 100
    assert model["thresholds_source"] == "thresholds.json"
    assert model["tta"] == "hflip"  # the tuned run's, from its thresholds.json
    assert model["version"] == __version__ and model["backend"] == "torch"
    assert model["max_batch"] == 1 and model["queue"] == 16
    assert model["max_body_bytes"] == 50_000_000
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue"] == 16
    assert model["ensemble_size"] == 1 and model["members"] == ["run/best.ckpt"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/v1/predict" in docs.text and "Prediction" in docs.text
    policy = docs.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # its only script is its own inline one (allowed by hash): nothing loads from elsewhere
    assert "<script src" not in docs.text and docs.text.count("<script>") == 1
    assert "http://" not in docs.text.replace("http://127.0.0.1", "") and "https://" not in \
        docs.text  # fmt: skip
    text = visible_text(docs.text)
    assert "`" not in text  # markdown code spans are rendered, never shown as backticks
    assert "POST /v1/predict" in text and "Try it" in text
    for line in ("curl -s -F file=@xray.png http://127.0.0.1/v1/predict -o result.json",
                 "curl -s http://127.0.0.1/v1/model", "curl -s http://127.0.0.1/healthz"):
        assert line in text, line  # an example for each endpoint, at the service's address
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/predict", "/v1/model", "/healthz"}
    # no request can name a server path: the only parameters are these two
    params = {p["name"] for op in schema["paths"].values() for m in op.values()
              for p in m.get("parameters", [])}  # fmt: skip
    assert params == {"format", "images"}


@pytest.fixture
def bad_files(tmp_path, sample_dir, make_dicom):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    png = sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()
    dicom = sorted((sample_dir / "dicom").glob("*.dcm"))[0]
    no_pixels = make_dicom(tmp_path / "nopix.dcm", None, Rows=8, Columns=8).read_bytes()
    ds = pydicom.dcmread(dicom)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(400)])  # a broken J2K stream
    buf = io.BytesIO()
    ds.save_as(buf)
    return {"png": png, "no_pixels": no_pixels, "undecodable": buf.getvalue(),
            "dicom": dicom.read_bytes()}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "status", "detail"),
    [
        ("text", 400, "upload: not a readable image (not PNG, JPEG, TIFF, BMP or DICOM)"),
        ("empty", 400, "upload: empty upload (no bytes)"),
        ("truncated_png", 400, "upload: not a readable image (image file is truncated)"),
        ("no_pixels", 422, "upload: DICOM file has no pixel data"),
        ("undecodable", 422, "upload: cannot decode DICOM pixel data (JPEG 2000 Image "
                         "Compression (Lossless Only)): "),
        ("truncated_dicom", 400, "upload: truncated DICOM: its pixel data is cut short"),
        ("no_file_part", 400, "multipart/form-data body without a file: send the image as "
                              "the field 'file'"),
        ("bad_multipart", 400, "multipart/form-data body without a boundary"),
        ("bad_format", 422, "query.format: Input should be 'json' or 'dicom-seg'"),
        ("named_path", 400, "_etc_passwd: not a readable image (not PNG, JPEG, TIFF, BMP or "
                                "DICOM)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_the_service_goes_on(client, bad_files, kind, status, detail):
    body, headers, params = b"", {}, {}
    if kind == "text":
        body = b"hello, not an image"
    elif kind == "truncated_png":
        body = bad_files["png"][:5000]
    elif kind in ("no_pixels", "undecodable"):
        body = bad_files[kind]
    elif kind == "truncated_dicom":
        body = bad_files["dicom"][: len(bad_files["dicom"]) // 2]
    elif kind == "no_file_part":
        body = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n'
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
    elif kind == "bad_multipart":
        body, headers = b"--x\r\n", {"Content-Type": "multipart/form-data"}
    elif kind == "bad_format":
        body, params = bad_files["png"], {"format": "xml"}
    if kind == "named_path":  # a client's file name is a label, never a path to read
        r = client.post("/v1/predict", files={"file": ("/etc/passwd", b"root:x:0:0")})
    else:
        r = client.post("/v1/predict", content=body, headers=headers, params=params)
    assert r.status_code == status, r.text
    message = r.json()["detail"]
    assert message.startswith(detail) and "\n" not in message
    ok = client.post("/v1/predict", content=bad_files["png"], params={"images": "false"})
    assert ok.status_code == 200 and ok.json()["width"] == 1024


def test_a_body_over_the_limit_is_413(run_dir, sample_dir):
    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_body_mb=0.4))
    png = sorted((sample_dir / "png_images").glob("*.png"))[0].read_bytes()
    assert len(png) > 400_000
    with TestClient(create_app(service), base_url=LOCAL) as c:
        r = c.post("/v1/predict", content=png)
        assert r.status_code == 413
        assert r.json()["detail"] == (
            f"request body too large: {len(png):,} bytes declared, the limit is 400,000 bytes "
            "(--max-body-mb)"
        )
        r = c.post("/v1/predict", files={"file": ("a.png", png)})  # multipart: the whole body
        assert r.status_code == 413
        assert c.post("/v1/predict", content=png[:300_000]).status_code == 400  # truncated
        assert c.get("/healthz").json()["in_flight"] == 0


def _raw_request(base: str, head: bytes, chunks=(), timeout: float = 60) -> bytes:
    """Send a request by hand (``head`` then ``chunks``), stop sending, read the answer until
    the service closes the connection."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = b""
        while True:  # the service closes the connection after a 413
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data


def test_413_is_sent_while_the_body_is_still_coming(run_dir):
    """Over a real socket: a declared length over the limit is refused before any byte of the
    body; a chunked body is refused as soon as one byte passes the limit, while the request
    is not finished (no last chunk is ever sent: a service that read the whole body first
    would never answer here)."""
    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_body_mb=1))
    with uvicorn_server(create_app(service)) as base:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: 60000000\r\n\r\n")  # fmt: skip
        answer = _raw_request(base, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"60,000,000 bytes declared" in answer
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        chunks = [b"f424\r\n" + b"x" * 62500 + b"\r\n"] * 16  # exactly the limit
        chunks.append(b"1\r\nx\r\n")  # one byte more, and no last chunk
        answer = _raw_request(base, head, chunks)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"more than 1,000,000 bytes sent" in answer
        health = httpx.get(base + "/healthz", timeout=30).json()
        # refused while being received: neither took a queue place, neither holds anything
        assert health["uploading"] == 0 and health["in_flight"] == 0
        assert health["answered"] == 0


def test_the_body_is_read_no_further_than_the_limit(run_dir):
    """At the ASGI level: of a body sent in 64 KiB pieces, the service takes the pieces up to
    the limit and one more, answers 413, and never asks for the rest."""
    import asyncio

    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_body_mb=1))
    app = create_app(service)
    piece, taken, sent = b"x" * 65536, [], []

    async def receive():
        taken.append(len(piece))
        return {"type": "http.request", "body": piece, "more_body": len(taken) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict",
             "query_string": b"", "headers": [(b"content-type", b"image/png"),
                                                    (b"host", b"127.0.0.1")],
             "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2),
             "root_path": "", "app": app}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(taken) == 1_000_000 // 65536 + 1  # 16 pieces: 1,048,576 bytes > the limit
    assert json.loads(sent[1]["body"])["detail"].startswith(
        "request body too large: more than 1,000,000 bytes sent"
    )


def test_real_uvicorn_batches_concurrent_requests(run_dir, images, predicted):
    """8 requests at once through a real uvicorn, the model held until all 8 are in: they run
    in micro-batches of at most 4 (--max-batch 4), the ones that waited together as one; each
    answer is its own image's: its mask is predict's, but for pixels whose probability is
    within float rounding of the threshold (a batch of another size may round the last bit
    differently)."""
    from ptxseg.data.imageio import read_image
    from ptxseg.predictor import Predictor

    service = Service.from_run(run_dir, device="cpu", limits=Limits(max_batch=4))
    chosen = images[:8]
    with uvicorn_server(create_app(service)) as base, httpx.Client(base_url=base,
                                                                    timeout=120) as http:
        with ThreadPoolExecutor(8) as pool, HeldModel(service.batcher) as held:
            futures = [pool.submit(post, http, p) for p in chosen]
            wait_until(lambda: held.held + service.batcher.waiting == 8,
                       what="8 images at the model")  # fmt: skip
            first = held.held
            held.release()
            answers = [f.result() for f in futures]
            health = http.get("/healthz").json()
    rest = [4] * ((8 - first) // 4) + ([(8 - first) % 4] if (8 - first) % 4 else [])
    expected: dict[str, int] = {}
    for size in [first, *rest]:
        expected[str(size)] = expected.get(str(size), 0) + 1
    assert health["batches"] == expected and "4" in expected
    assert health["peak_in_flight"] == 8 and health["in_flight"] == 0
    reference = Predictor.from_run(run_dir, device="cpu", tta="hflip", batch_size=1)
    for path, r in zip(chosen, answers, strict=True):
        assert r.status_code == 200, r.text
        mask = png_of(r.json()["mask_png"])
        differ = mask != predicted[str(path)]["mask"]
        native = reference.image_probs([read_image(path)])[0]
        assert np.all(np.abs(native[differ] - 0.5) < 1e-5), path.name
