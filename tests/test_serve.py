"""`minidiff serve`: server-side validation, and the page driven in a real headless Chromium."""

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from minidiff.serve import Generator, Request, RequestError

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"reduced-cond": {"conditional": True, "num_classes": 10},
          "plain": {"conditional": False, "num_classes": 0}}


@pytest.mark.parametrize("body, field", [
    ({"model": "/etc/passwd"}, "model must be one of"),
    ({"model": "plain", "n": 65}, "n must be an integer in 1..64"),
    ({"model": "plain", "n": "8"}, "n must be an integer"),
    ({"model": "plain", "steps": 0}, "steps must be an integer in 1..1000"),
    ({"model": "plain", "steps": 2.5}, "steps must be an integer"),
    ({"model": "plain", "seed": -1}, "seed must be"),
    ({"model": "plain", "sampler": "magic"}, "sampler must be one of"),
    ({"model": "plain", "class": 3}, "is unconditional"),
    ({"model": "reduced-cond", "class": 10}, "class must be an integer in 0..9"),
    ({"model": "reduced-cond", "class": 1, "guidance": 11}, "guidance must be a number"),
    ([1, 2], "JSON object"),
])
def test_every_field_is_validated(body, field):
    with pytest.raises(RequestError, match=field):
        Request.parse(body, MODELS)


def test_defaults_and_conditional_guidance():
    r = Request.parse({"model": "reduced-cond", "class": 7}, MODELS)
    assert (r.steps, r.n, r.seed, r.cls, r.guidance) == (8, 16, 0, 7, 1.5)
    assert Request.parse({"model": "reduced-cond"}, MODELS).guidance is None


def test_one_request_is_bounded_in_time():
    gen = Generator(max_seconds=0.01)
    req = Request.parse({"model": "reduced-cond", "steps": 1000, "n": 64}, gen.info)
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="stopped after"):
        gen.run(req)
    assert time.perf_counter() - t0 < 5


def _chromium() -> str | None:
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                 shutil.which("chromium-browser") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minidiff", "serve", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/api/models", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"minidiff serve exited: {proc.stdout.read().decode()[-500:]}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium: .ci/run installs the Debian package `chromium`")
        pytest.skip("no system Chromium (apt-get install chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1000, "height": 760})
        pg.goto(server)
        pg.wait_for_selector("body[data-ready='1']", timeout=20_000)
        yield pg
        browser.close()


def test_browser_generates_the_requested_grid(page):
    from PIL import Image

    page.select_option("#model", "reduced-cond")
    page.select_option("#class", "7")
    page.fill("#n", "16")
    page.fill("#steps", "8")
    page.click("#generate")
    page.wait_for_selector("#latency", timeout=60_000)
    src = page.get_attribute("#grid", "src")
    assert src.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    # 16 images, 8 per row: 2 rows x 8 columns of 28 px + 2 px padding, drawn 2x
    assert img.size == (2 * (8 * 30 + 2), 2 * (2 * 30 + 2))
    assert img.getextrema()[1] > 200  # not an empty (all-dark) image
    latency = page.inner_text("#latency")
    assert latency.endswith(" s") and float(latency[:-2]) > 0
    assert "600,737 parameters" in page.inner_text("#stats")
    assert page.inner_text("#error") == ""
    page.screenshot(path=str(ROOT / "docs" / "serve.png"))


def test_browser_shows_a_clear_error_for_out_of_range_values(page):
    page.select_option("#model", "reduced-cond")
    page.fill("#n", "500")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0",
                           timeout=20_000)
    assert page.inner_text("#error") == "Error: n must be an integer in 1..64, got 500"
    page.fill("#n", "16")
    page.fill("#steps", "-3")
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('error').textContent.includes('steps')", timeout=20_000)
    assert "steps must be an integer in 1..1000, got -3" in page.inner_text("#error")
