"""The viewer of ``ptxseg serve`` in a real browser: headless Chromium (Debian's ``chromium``
package, the system browser: nothing is downloaded) driven by Playwright, against ``ptxseg
serve`` with a token in a child process on 127.0.0.1.

A person's path through the page: it asks for the service's token first (kept in the tab,
sent in the Authorization header only, never in an address); a file that is not an image
shows the service's one-line reason; a real SIIM radiograph chosen in the file input is drawn
at its own size with exactly the service's mask tinted (pixels read back from the canvas and
compared with the answer's mask: the finding, its area and the picture agree); the slider
redraws the region for another threshold from the returned probability map, and the page says
that this view is without the removal of small components, not the finding; the reset goes
back to the service's mask; the mask download is the service's mask. The API reference's
"try it" form answers from the service. Every request the page makes goes to the service: no
CDN, nothing outside 127.0.0.1.

Skipped where no Chromium or no Playwright is installed, except in CI
(``PTXSEG_REQUIRE_CHROMIUM=1``, set by ``.ci/run``), where either missing is a failure.
"""

from __future__ import annotations

import base64
import os
import secrets
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
TOKEN = secrets.token_urlsafe(24)


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
    """``ptxseg serve RUN --port 0`` with a token (from the environment) in a child process;
    its base URL. Stopped by Ctrl+C."""
    root = tmp_path_factory.mktemp("serve-browser")
    run = served_run(root)
    proc, url = start(["serve", str(run), "--port", "0", "--device", "cpu"], root,
                      PTXSEG_SERVE_TOKEN=TOKEN)  # fmt: skip
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


def tinted(drawn: np.ndarray) -> np.ndarray:
    rgb = drawn.astype(int)
    return rgb[..., 0] - rgb[..., 2] > TINT_MIN


def check_gray_elsewhere(drawn: np.ndarray, region: np.ndarray) -> None:
    """Outside ``region`` the canvas is the plain (gray) radiograph."""
    rgb = drawn.astype(int)
    assert (rgb[~region].max(axis=1) - rgb[~region].min(axis=1)).max() == 0


def check_map_view(drawn: np.ndarray, prob_map: np.ndarray, t: float) -> int:
    """The canvas (the image's size) has exactly the region of ``prob_map`` above ``t`` tinted
    (away from its edges, which the page's scaling of the reduced map blends); returns the
    tinted count."""
    cut = int(np.floor(t * 255 + 1e-6))  # the page's rule: value / 255 > t
    above = cv2.resize((prob_map > cut).astype(np.uint8), drawn.shape[1::-1],
                       interpolation=cv2.INTER_NEAREST)  # fmt: skip
    kernel = np.ones((13, 13), np.uint8)
    inside = cv2.erode(above, kernel).astype(bool)
    outside = ~cv2.dilate(above, kernel).astype(bool)
    assert inside.sum() > 1000 and outside.sum() > 1000  # the check below has pixels to judge
    region = tinted(drawn)
    assert region[inside].mean() > 0.99 and not region[outside].any()
    check_gray_elsewhere(drawn, ~outside)  # away from the region: the plain radiograph
    return int(region.sum())


def test_the_viewer_draws_the_services_mask_in_headless_chromium(service, sample_dir, tmp_path):
    chromium = _chromium()
    sync_playwright = _playwright()
    image = sorted((sample_dir / "png_images").glob("*_1_.png"))[0]
    with httpx.Client(base_url=service, timeout=300) as http:
        answer = http.post("/v1/predict", files={"file": (image.name, image.read_bytes())},
                           headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    expected = answer.json()
    mask = png_of(expected["mask_png"]) > 0
    prob_map = png_of(expected["probability_map"]["png"])
    assert mask.shape == (1024, 1024) and prob_map.shape == (256, 256)
    counts = {t: int((prob_map > np.floor(t * 255 + 1e-6)).sum()) for t in (0.5, 0.9)}
    assert counts[0.5] > counts[0.9] > 0  # the slider has something to change on this image
    # the map above the rule's threshold is not the mask (the rule removes small components):
    # a view drawn from the map at the start would disagree with the finding
    above = cv2.resize((prob_map > 127).astype(np.uint8), (1024, 1024),
                       interpolation=cv2.INTER_NEAREST)  # fmt: skip
    regions = cv2.connectedComponents(mask.astype(np.uint8))[0] - 1
    assert cv2.connectedComponents(above)[0] - 1 > regions >= 1

    requests: list = []
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
            page.on("request", lambda r: requests.append(r))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)  # fmt: skip
            page.goto(service + "/")
            assert page.title() == "ptxseg: pneumothorax segmentation"
            # the token first: the page asked /v1/model and got 401
            page.wait_for_selector("body[data-state=login]", timeout=60_000)
            assert page.text_content("#status") == "this service needs its token"
            assert page.is_visible("#login") and page.is_disabled("#file")
            assert page.is_hidden("#view") and page.is_hidden("#results")  # no empty canvas
            page.fill("#token", TOKEN)
            page.click("#login button")
            page.wait_for_selector("body[data-state=idle]", timeout=60_000)
            assert page.text_content("#status") == "no image yet" and page.is_hidden("#login")
            assert page.text_content("#model").startswith(
                "run run: unet/efficientnet-b0, 64 px, tta hflip, ptxseg ")
            assert page.input_value("#token") == ""  # not left in the field

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
            # the starting picture is the service's mask, pixel for pixel at the image's size
            drawn = canvas_pixels(page)
            assert drawn.shape[:2] == mask.shape
            np.testing.assert_array_equal(tinted(drawn), mask)
            check_gray_elsewhere(drawn, mask)
            assert page.get_attribute("#view", "data-source") == "service-mask"
            assert page.get_attribute("#view", "data-above") == str(expected["area_px"])
            assert page.text_content("#viewnote").startswith("This view is the service's mask")
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

            # the slider (keyboard, as a person would): 0.50 -> 0.90, the map's region, said so
            page.focus("#threshold")
            for _ in range(40):
                page.keyboard.press("ArrowRight")
            assert page.text_content("#tvalue") == "0.90"
            assert page.get_attribute("#view", "data-source") == "probability-map"
            tinted_09 = check_map_view(canvas_pixels(page), prob_map, 0.9)
            assert 0 < tinted_09 < int(mask.sum())
            note = page.text_content("#viewnote")
            assert note.startswith("Exploring: pixels above 0.90 in the reduced probability map "
                                   "(256 px), without the rule's removal of small components. "
                                   "Not the service's finding")  # fmt: skip
            assert page.text_content("#above").endswith("of the reduced map above 0.90")
            page.screenshot(path=str(tmp_path / "viewer-0.90.png"), full_page=True)
            # at 0.50 again by hand, then the reset: the service's mask each time
            for _ in range(40):
                page.keyboard.press("ArrowLeft")
            np.testing.assert_array_equal(tinted(canvas_pixels(page)), mask)
            page.keyboard.press("ArrowLeft")
            assert page.get_attribute("#view", "data-source") == "probability-map"
            page.click("#reset")
            assert page.get_attribute("#view", "data-source") == "service-mask"
            np.testing.assert_array_equal(tinted(canvas_pixels(page)), mask)

            # the mask download is the service's mask
            with page.expect_download() as info:
                page.click("#dl-mask")
            download = info.value
            assert download.suggested_filename == f"{image.stem}_mask.png"
            got = cv2.imread(download.path(), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(got, png_of(expected["mask_png"]))
            assert int((got > 0).sum()) == expected["area_px"]

            # the API reference: rendered text, and its "try it" form asks the service
            page.goto(service + "/docs")
            assert "`" not in page.inner_text("body")
            page.fill("#try-token", TOKEN)
            page.click("#try-model")
            page.wait_for_selector("body[data-tried='200']", timeout=60_000)
            assert '"run": "run"' in page.text_content("#try-out")
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        finally:
            browser.close()

    assert outside == []  # nothing outside the service: the page works without a CDN
    urls = [r.url for r in requests]
    assert urls and all(u.startswith((service + "/", "data:", "blob:")) for u in urls)
    assert urls.count(service + "/v1/predict") == 2
    # the token goes in the Authorization header of the service's own requests, never in
    # an address
    assert not any(TOKEN in u for u in urls)
    api = [r for r in requests if r.url.startswith(service + "/v1/")]
    assert len(api) == 5  # /v1/model (401), /v1/model, 2 x /v1/predict, /v1/model from /docs
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api[1:])
    # no script error, no Content-Security-Policy violation: only the browser's notes of the
    # 401 before the token and of the non-image's 400
    noted = [p for p in problems if p.startswith("console error:") and (" 400 " in p
                                                                        or " 401 " in p)]
    assert len(noted) == 2 and [p for p in problems if p not in noted] == [], problems
    shot = cv2.imread(str(tmp_path / "viewer.png"))
    assert shot is not None and shot.shape[1] == 1280 and shot.std() > 20
