"""The web page's modes in a real headless Chromium: with a generator served, pick 'the generator', see
captions written in the trait's voice and tagged as generated; without one, the mode picker stays hidden.

Needs Debian's `chromium` and `chromium-driver` (driven through Selenium, no downloads); skipped without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerThread, free_port, image_bytes

pytestmark = pytest.mark.browser


def _server(tiny_checkpoint, service_index_root, generator: Path | None) -> ServerThread:
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None, checkpoint=tiny_checkpoint.path, index_root=service_index_root,
                               generator=generator, device="cpu")
    return ServerThread(create_app(settings), free_port())


@pytest.fixture(scope="module")
def generating_server(tiny_checkpoint, service_index_root, tiny_generator_path) -> Iterator[str]:
    with _server(tiny_checkpoint, service_index_root, tiny_generator_path) as server:
        yield server.base_url


def test_generate_mode_on_the_page(browser, generating_server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=5))
    wait = WebDriverWait(browser, 20)
    browser.get(generating_server + "/")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"]')))
    wait.until(lambda d: d.find_element(By.ID, "mode-picker").is_displayed())
    assert "updown" in browser.find_element(By.ID, "generator-info").text
    assert browser.find_element(By.ID, "beam-size").get_attribute("value") == "3"

    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"] input').click()
    browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="generate"]').click()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result li.caption")) == 3)
    captions = browser.find_elements(By.CSS_SELECTOR, "#results .result li.caption")
    assert all(c.get_attribute("data-source") == "generated" for c in captions)
    assert captions[0].find_element(By.CLASS_NAME, "caption-text").text.startswith("aww look at")
    assert captions[0].find_element(By.CLASS_NAME, "source").text == "generated"
    assert "generate" in browser.find_element(By.ID, "status").text
    assert "log-probabilities" in browser.find_element(By.ID, "score-legend").text

    browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="hybrid"]').click()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: "rescore" in d.find_element(By.ID, "status").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .result li.caption")) == 5

    browser.find_element(By.ID, "consensus").click()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: "consensus" in d.find_element(By.ID, "status").text)
    assert "rescore" not in browser.find_element(By.ID, "status").text
    assert "agreement (CIDEr-D" in browser.find_element(By.ID, "score-legend").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .result li.caption")) == 5


def test_no_mode_picker_without_a_generator(browser, tiny_checkpoint, service_index_root) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    with _server(tiny_checkpoint, service_index_root, None) as server:
        browser.get(server.base_url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"]')))
        wait.until(lambda d: d.find_element(By.ID, "model-info").text)
        assert not browser.find_element(By.ID, "mode-picker").is_displayed()
