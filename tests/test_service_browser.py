"""The web page in a real headless Chromium: load it, upload a JPEG, pick a personality, see captions.

Needs Debian's `chromium` and `chromium-driver` (driven through Selenium, no downloads); skipped without them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import ServerThread, free_port, image_bytes

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_server(tiny_checkpoint, service_index_root) -> Iterator[str]:
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None, checkpoint=tiny_checkpoint.path, index_root=service_index_root,
                               device="cpu")
    with ServerThread(create_app(settings), free_port()) as server:
        yield server.base_url


def test_upload_pick_and_see_captions(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=5))
    wait = WebDriverWait(browser, 20)
    browser.get(page_server + "/")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"]')))

    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())

    search = browser.find_element(By.ID, "trait-search")
    search.send_keys("swe")
    shown = [li.get_attribute("data-trait") for li in browser.find_elements(By.CSS_SELECTOR, "#trait-list li")]
    assert shown == ["Sweet"]
    browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"] input').click()
    search.clear()
    search.send_keys("sarc")
    browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sarcastic"] input').click()
    chips = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#selected-traits .chip")]
    assert [c.split(" ")[0] for c in chips] == ["Sweet", "Sarcastic"]

    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 2)
    results = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert [r.find_element(By.TAG_NAME, "h3").text for r in results] == ["Sweet", "Sarcastic"]
    for result in results:
        captions = result.find_elements(By.CSS_SELECTOR, "li.caption")
        assert len(captions) == 5
        assert all(c.find_element(By.CLASS_NAME, "caption-text").text for c in captions)
        float(captions[0].find_element(By.CLASS_NAME, "score").text)
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert "ms" in browser.find_element(By.ID, "status").text


def test_page_reports_errors(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_server + "/")
    browser.find_element(By.ID, "submit").click()
    error = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error"))
    WebDriverWait(browser, 10).until(lambda d: error.is_displayed())
    assert "photo" in error.text.lower()


@pytest.mark.parametrize(("path", "title_selector"), [("/docs", ".swagger-ui .info .title"),
                                                      ("/redoc", ".api-info h1")])
def test_api_docs_render_offline(browser, page_server, path, title_selector):
    """Swagger UI and ReDoc load every asset from the app itself (the browser has no network here).

    ReDoc's bundle hard-codes one "powered by" logo on its CDN; the page's CSP (img-src 'self') blocks it.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_server + path)
    title = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, title_selector))
    assert "TransResNet" in title.text
    foreign = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith(location.origin) && !n.startsWith('blob:') && !n.startsWith('data:'))")
    assert [n for n in foreign if n != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == []
