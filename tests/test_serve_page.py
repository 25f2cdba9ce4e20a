"""The page of `mixnet serve` in a real browser: headless Chromium (Debian's package, driven by playwright)
picks an example photo and shows the same top-5 as mixnet.predict."""

from __future__ import annotations

import os
import shutil

import pytest

import mixnet
from conftest import HEAVY
from serve_process import EXAMPLES, free_port, running_server

pytestmark = HEAVY

# Browser downloads are impossible here: playwright drives the system's Chromium (.ci/run installs it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_ENV = "MIXNET_PAGE_SCREENSHOT"  # a PNG path: keep a picture of the page as the test left it


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_page_uploads_a_photo_and_shows_the_top_5_of_mixnet_predict(tmp_path):
    from playwright.sync_api import sync_playwright

    photo = next(p for p in EXAMPLES if p.stem == "golf_ball")
    expected = mixnet.predict(mixnet.load_model(mixnet.DEFAULT_TAG).eval(), [photo], topk=5)[0].top
    with running_server(tmp_path) as server, sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#results .row", timeout=60_000)
            labels = page.locator("#results .row .label").all_text_contents()
            percents = page.locator("#results .row .prob").all_text_contents()
            widths = page.eval_on_selector_all("#results .bar span", "spans => spans.map(s => s.style.width)")
            if os.environ.get(SCREENSHOT_ENV):
                page.screenshot(path=os.environ[SCREENSHOT_ENV], full_page=True)
        finally:
            browser.close()
    assert labels[0] == expected[0].name == "golf ball"
    assert labels == [s.name for s in expected]
    assert percents == [f"{100 * s.probability:.2f}%" for s in expected]
    assert [float(w.rstrip("%")) for w in widths] == pytest.approx([100 * s.probability for s in expected], abs=0.05)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_page_shows_an_error_answer_that_is_not_json_as_its_status_not_as_a_parse_failure():
    """A reverse proxy's HTML error page (nginx's 413 for a photo over its body limit) or uvicorn's plain-text
    503 reaches the page instead of the server's JSON; the page is served here without a server."""
    from importlib import resources

    from playwright.sync_api import sync_playwright

    page_html = resources.files("mixnet.serve").joinpath("page.html").read_text(encoding="utf-8")
    photo = next(p for p in EXAMPLES if p.stem == "golf_ball")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            # A loopback origin where nothing listens; every request is answered here, and any other aborted
            # (routes run last registered first), so the browser never reaches out.
            origin = f"http://127.0.0.1:{free_port()}"
            page.route("**/*", lambda r: r.abort())
            page.route(f"{origin}/", lambda r: r.fulfill(status=200, content_type="text/html", body=page_html))
            page.route(f"{origin}/info", lambda r: r.fulfill(status=200, content_type="application/json",
                                                             body='{"model": "m", "classes": ["a"]}'))
            page.route(f"{origin}/predict", lambda r: r.fulfill(
                status=413, content_type="text/html", body="<html><body><h1>413 Request Entity Too Large</h1></body></html>"))
            page.goto(f"{origin}/")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            status = page.locator("#status").text_content()
        finally:
            browser.close()
    assert status.startswith("Error 413") and "SyntaxError" not in status and "Request failed" not in status
