"""The web page of ``bitray serve`` in a real headless browser (Debian's chromium through Selenium), against
the real app on Ray Serve over a small embedded and indexed output.

Set ``BITRAY_SCREENSHOT_DIR=docs`` to write the README's screenshot (``serve-page.png``) there; otherwise it
goes to the test's tmp dir.
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"the browser test needs Debian's chromium and chromedriver at {CHROMIUM} and {CHROMEDRIVER} "
        "(apt-get install chromium chromium-driver; CI installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

K = 10
QUERY = "chelsea.jpg"


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_local) -> Iterator[dict]:
    """The real app on Ray Serve (127.0.0.1, a free port) over scikit-image's sample photos, embedded
    with random:tiny and indexed. No classifier: its replica would add ~25 s here (labels: test_serve.py)."""
    from cluster_fixtures import free_port
    from embed_fixtures import tiny_config
    from ray import serve

    from bitray.embed import run_embedding
    from bitray.examples import write_sample_photos
    from bitray.search.index import update_index
    from bitray.serve.app import build
    from bitray.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("page")
    photos = write_sample_photos(root / "photos")
    output = root / "out"
    run_embedding(tiny_config([str(photos)], str(output)))
    update_index(str(output))
    config = ServeConfig(
        index=str(output / "_index"),
        port=free_port(),
        replicas_max=1,
        batch_size=4,
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build(config), name="bitray", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{config.port}/", "photos": photos}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1200,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def settled(driver: webdriver.Chrome, timeout: float = 30) -> str:
    """Waits for the page to finish its query; returns its state ("done" or "error")."""
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
    )
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def upload(driver: webdriver.Chrome, path: Path) -> str:
    driver.execute_script("document.body.dataset.state = 'idle'")
    driver.find_element(By.ID, "file").send_keys(str(path))
    return settled(driver)


def results(driver: webdriver.Chrome) -> list[tuple[str, float]]:
    """The result grid as (path, shown similarity), in order."""
    return [
        (b.get_attribute("data-path"), float(b.find_element(By.CLASS_NAME, "sim").text))
        for b in driver.find_elements(By.CSS_SELECTOR, "#results button.result")
    ]


def script_errors(driver: webdriver.Chrome) -> list[str]:
    """The page's JavaScript errors since the last call (a refused request's own console line excepted)."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def url_query(driver: webdriver.Chrome) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlparse(driver.current_url).query))


def thumbnails_loaded(driver: webdriver.Chrome) -> bool:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )


def save_screenshot(driver: webdriver.Chrome, tmp_path: Path) -> Path:
    """The whole page at 1200 px wide, where BITRAY_SCREENSHOT_DIR says or in the test's tmp dir."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    target = Path(os.environ.get("BITRAY_SCREENSHOT_DIR") or tmp_path) / "serve-page.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        # 256 colours: the README's PNG at under half the size, no visible loss on this page
        shot.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            target, optimize=True
        )
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return target


def test_upload_click_share_reload(app, browser, tmp_path):
    query = app["photos"] / QUERY
    browser.get(f"{app['url']}?k={K}")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text.startswith("Model "))

    assert upload(browser, query) == "done"
    found = results(browser)
    assert len(found) == K
    assert found[0][0] == str(query) and found[0][1] >= 0.999, found
    assert all(a[1] >= b[1] for a, b in zip(found, found[1:], strict=False)), found
    WebDriverWait(browser, 20).until(thumbnails_loaded)
    assert "chelsea.jpg" in browser.find_element(By.ID, "query-name").text
    shot = save_screenshot(browser, tmp_path)
    assert shot.stat().st_size > 10_000

    second = found[1][0]
    browser.execute_script("document.body.dataset.state = 'idle'")
    browser.find_elements(By.CSS_SELECTOR, "#results button.result")[1].click()
    assert settled(browser) == "done"
    assert url_query(browser) == {"path": second, "k": str(K)}
    by_path = results(browser)
    assert len(by_path) == K and second not in [p for p, _ in by_path]  # a query by path leaves itself out

    browser.execute_script("document.body.dataset.state = 'idle'")
    browser.back()  # to the upload: its history entry holds the image
    assert settled(browser) == "done"
    assert results(browser) == found and url_query(browser) == {"k": str(K)}
    browser.execute_script("document.body.dataset.state = 'idle'")
    browser.forward()
    assert settled(browser) == "done"
    assert results(browser) == by_path

    browser.get(browser.current_url)  # a shared link, opened afresh
    assert settled(browser) == "done"
    assert results(browser) == by_path
    assert browser.find_element(By.ID, "query-name").text == second
    assert browser.find_element(By.ID, "k").get_attribute("value") == str(K)

    assert script_errors(browser) == []


def test_a_non_image_upload_shows_the_servers_reason(app, browser, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"these are not pixels\n" * 10)
    request = urllib.request.Request(f"{app['url']}search?k=3", data=notes.read_bytes(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert 400 <= refused.value.code < 500
    reason = json.loads(refused.value.read())["error"]

    browser.get(app["url"])
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model").text.startswith("Model "))
    assert upload(browser, notes) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and reason in error.text, (reason, error.text)
    assert not browser.find_element(By.ID, "results-box").is_displayed()
