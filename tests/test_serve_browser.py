"""The viewer of ``ptxseg serve`` in a real browser: headless Chromium (Debian's ``chromium``
package, the system browser: nothing is downloaded) driven by Playwright, against ``ptxseg
serve`` in a child process on 127.0.0.1.

A person's path through the page: it opens with no empty canvas; a file that is not an image
shows the service's one-line reason; a real SIIM radiograph chosen in the file input is drawn
with the predicted region tinted where the returned probability map is above the threshold
(pixels read back from the canvas and compared with the service's own preview and map); the
slider redraws the region for another threshold; the mask download is the service's mask.
Every request the page makes goes to the service: no CDN, nothing outside 127.0.0.1.

Skipped where no Chromium or no Playwright is installed, except in CI
(``PTXSEG_REQUIRE_CHROMIUM=1``, set by ``.ci/run``), where either missing is a failure.
"""

from __future__ import annotations

import base64
import os
import signal

import cv2
import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ptxseg serve needs the serve extra")

from tests.conftest import reap  # noqa: E402
from tests.serve_util import served_run, start  # noqa: E402
from tests.test_report_browser import _chromium  # noqa: E402

TINT_MIN = 20  # red minus blue of a tinted pixel (the tint is (213, 94, 0); the image is gray)


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        msg = "playwright not installed (the dev extra)"
        if os.environ.get("PTXSEG_REQUIRE_CHROMIUM") == "1":
            pytest.fail(msg + " (PTXSEG_REQUIRE_CHROMIUM=1)")
        pytest.skip(msg)
    return sync_playwright


def png_of(b64: str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), flags)
    assert image is not None
    return image


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """``ptxseg serve RUN --port 0`` in a child process; its base URL. Stopped by Ctrl+C."""
    root = tmp_path_factory.mktemp("serve-browser")
    run = served_run(root)
    proc, url = start(["serve", str(run), "--port", "0", "--device", "cpu"], root)
    try:
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            reap(proc)


def canvas_pixels(page) -> np.ndarray:
    """The viewer's canvas as drawn, RGB (a lossless PNG of it, decoded here)."""
    url = page.eval_on_selector("#view", "v => v.toDataURL('image/png')")
    bgr = png_of(url.split(",", 1)[1], cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_drawn(drawn: np.ndarray, preview: np.ndarray, prob_map: np.ndarray, t: float) -> int:
    """The canvas is the service's preview with exactly the region of ``prob_map`` above ``t``
    tinted (away from its edges, which the page's scaling blends); returns the tinted count."""
    assert drawn.shape[:2] == preview.shape
    cut = int(np.floor(t * 255 + 1e-6))  # the page's rule: value / 255 > t
    above = cv2.resize((prob_map > cut).astype(np.uint8), preview.shape[::-1],
                       interpolation=cv2.INTER_NEAREST)  # fmt: skip
    kernel = np.ones((9, 9), np.uint8)
    inside = cv2.erode(above, kernel).astype(bool)
    outside = ~cv2.dilate(above, kernel).astype(bool)
    assert inside.sum() > 1000 and outside.sum() > 1000  # the check below has pixels to judge
    rgb = drawn.astype(int)
    tinted = rgb[..., 0] - rgb[..., 2] > TINT_MIN
    assert tinted[inside].mean() > 0.99
    assert not tinted[outside].any()
    # outside the region the canvas is the plain radiograph, pixel for pixel
    gray = preview.astype(int)
    assert np.abs(rgb[outside] - gray[outside][:, None]).max() <= 1
    assert (np.abs(rgb[inside] - gray[inside][:, None]).max(axis=1) > TINT_MIN).mean() > 0.99
    return int(tinted.sum())


def test_the_viewer_draws_the_overlay_in_headless_chromium(service, sample_dir, tmp_path):
    chromium = _chromium()
    sync_playwright = _playwright()
    image = sorted((sample_dir / "png_images").glob("*_1_.png"))[0]
    with httpx.Client(base_url=service, timeout=300) as http:
        answer = http.post("/v1/predict", files={"file": (image.name, image.read_bytes())})
    assert answer.status_code == 200, answer.text
    expected = answer.json()
    preview = png_of(expected["preview_png"])
    prob_map = png_of(expected["probability_map"]["png"])
    assert preview.shape == (512, 512) and prob_map.shape == (256, 256)
    counts = {t: int((prob_map > np.floor(t * 255 + 1e-6)).sum()) for t in (0.5, 0.9)}
    assert counts[0.5] > counts[0.9] > 0  # the slider has something to change on this image

    requests: list[str] = []
    outside: list[str] = []
    problems: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith((service + "/", "data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900},
                                          accept_downloads=True)  # fmt: skip
            page = context.new_page()
            page.route("**/*", route)
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)  # fmt: skip
            page.goto(service + "/")
            assert page.title() == "ptxseg: pneumothorax segmentation"
            assert page.text_content("#status") == "no image yet"
            assert page.is_hidden("#view") and page.is_hidden("#results")  # no empty canvas

            # not an image: the service's one-line reason, and the page goes on
            page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png",
                                                  "buffer": b"not an image at all"}])  # fmt: skip
            page.wait_for_selector("body[data-state=error]", timeout=120_000)
            status = page.text_content("#status")
            assert status.startswith("400: ") and "\n" not in status, status
            assert page.is_hidden("#view")

            # a real radiograph, chosen in the file input
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            assert page.text_content("#status") == f"{image.name}: done"
            assert page.is_visible("#view") and page.is_visible("#results")
            box = page.locator("#view").bounding_box()
            assert box["width"] > 200 and box["height"] > 200
            assert page.input_value("#threshold") == "0.5"  # the run's rule
            finding = page.text_content("#finding")
            assert finding == ("PNEUMOTHORAX predicted" if expected["has_pneumothorax"]
                               else "no pneumothorax predicted")  # fmt: skip
            assert f"{expected['area_px']:,} px" in page.text_content("#facts")
            drawn = canvas_pixels(page)
            tinted_05 = check_drawn(drawn, preview, prob_map, 0.5)
            assert page.get_attribute("#view", "data-above") == str(counts[0.5])
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

            # the slider (keyboard, as a person would): 0.50 -> 0.90 redraws a smaller region
            page.focus("#threshold")
            for _ in range(40):
                page.keyboard.press("ArrowRight")
            assert page.text_content("#tvalue") == "0.90"
            assert page.get_attribute("#view", "data-above") == str(counts[0.9])
            tinted_09 = check_drawn(canvas_pixels(page), preview, prob_map, 0.9)
            assert 0 < tinted_09 < tinted_05
            assert page.text_content("#above").endswith("of the image above 0.90")

            # the mask download is the service's mask
            with page.expect_download() as info:
                page.click("#dl-mask")
            download = info.value
            assert download.suggested_filename == f"{image.stem}_mask.png"
            mask = cv2.imread(download.path(), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(mask, png_of(expected["mask_png"]))
            assert int((mask > 0).sum()) == expected["area_px"]
        finally:
            browser.close()

    assert outside == []  # nothing outside the service: the page works without a CDN
    assert requests and all(u.startswith((service + "/", "data:", "blob:")) for u in requests)
    assert requests.count(service + "/v1/predict") == 2
    # no script error, no Content-Security-Policy violation: only the browser's note of the
    # non-image's 400
    refused = [p for p in problems if p.startswith("console error:") and " 400 " in p]
    assert len(refused) == 1 and [p for p in problems if p not in refused] == [], problems
    shot = cv2.imread(str(tmp_path / "viewer.png"))
    assert shot is not None and shot.shape[1] == 1280 and shot.std() > 20
