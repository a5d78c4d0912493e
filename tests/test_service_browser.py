"""The web page in a real headless Chromium: load it, upload a JPEG, pick a personality, see captions.

Needs Debian's `chromium` and `chromium-driver` (driven through Selenium, no downloads); skipped without them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import ServerThread, free_port, image_bytes

pytestmark = pytest.mark.browser

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


def _wait():
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait


def test_the_page_names_the_model_in_words_and_explains_scores(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = _wait()(browser, 20)
    browser.get(page_server + "/")
    info = wait.until(lambda d: d.find_element(By.ID, "model-info").text and d.find_element(By.ID, "model-info"))
    assert "test_resnet image encoder" in info.text and "4 personalities" in info.text
    assert "fingerprint" in info.get_attribute("title")  # hashes on hover, not in the text
    icon = browser.find_element(By.CSS_SELECTOR, 'link[rel="icon"]').get_attribute("href")
    assert browser.execute_script(f"return fetch({icon!r}).then(r => r.status)") == 200
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=6))
    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"] input').click()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
    legend = browser.find_element(By.ID, "score-legend")
    assert legend.is_displayed() and "similarity" in legend.text


def test_a_failed_request_clears_old_results(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = _wait()(browser, 20)
    browser.get(page_server + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"]'))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=7))
    browser.find_element(By.ID, "image-input").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"] input').click()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
    browser.execute_script("document.getElementById('k').value = '500'")  # the API refuses k > 100
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []
    assert not browser.find_element(By.ID, "score-legend").is_displayed()


def test_a_non_image_gets_a_message_not_a_broken_preview(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server + "/")
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    browser.find_element(By.ID, "image-input").send_keys(str(text))
    error = _wait()(browser, 10).until(lambda d: d.find_element(By.ID, "error").is_displayed()
                                       and d.find_element(By.ID, "error"))
    assert "not an image" in error.text
    assert not browser.find_element(By.ID, "preview").is_displayed()


def test_a_model_without_personalities_needs_no_ticking(browser, plain_settings, tmp_path):
    from selenium.webdriver.common.by import By
    from transresnet.service.main import create_app

    with ServerThread(create_app(plain_settings), free_port()) as server:
        wait = _wait()(browser, 20)
        browser.get(server.base_url + "/")
        note = wait.until(lambda d: d.find_element(By.ID, "no-traits").is_displayed() and d.find_element(By.ID,
                                                                                                         "no-traits"))
        assert "no personalities" in note.text
        assert not browser.find_element(By.ID, "trait-list").is_displayed()
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(image_bytes("JPEG", size=(120, 90), seed=8))
        browser.find_element(By.ID, "image-input").send_keys(str(photo))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
        assert browser.find_element(By.CSS_SELECTOR, "#results .result h3").text == "none"


def test_the_real_photo_demo_shows_its_val_photos_and_what_it_knows(browser, tiny_text_model, tmp_path):
    """The flickr8k demo recipe (tiny models, a few generated photos): the page offers the held-out photos as
    images that load, says the model knows Flickr8k-like photos in template voices, and ranks a sample."""
    from selenium.webdriver.common.by import By
    from transresnet.service.demo import ensure_demo
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    from tests.test_service_demo import photo_folder, tiny_demo_overrides

    photos = photo_folder(tmp_path / "photos", train=4, val=3)
    checkpoint, index_root = ensure_demo(tmp_path / "demo", "flickr8k", data=photos,
                                         overrides=tiny_demo_overrides(tiny_text_model))
    settings = ServiceSettings(_env_file=None, checkpoint=checkpoint, index_root=index_root, device="cpu")
    with ServerThread(create_app(settings), free_port()) as server:
        wait = _wait()(browser, 20)
        browser.get(server.base_url + "/")
        wait.until(lambda d: d.find_element(By.ID, "samples").is_displayed())
        images = browser.find_elements(By.CSS_SELECTOR, "#sample-list button.sample img")
        assert [img.get_attribute("alt") for img in images] == ["photo_0_04.jpg", "photo_0_05.jpg", "photo_0_06.jpg"]
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                                 for img in images))
        assert {browser.execute_script("return arguments[0].naturalWidth", img) for img in images} == {48}
        info = wait.until(lambda d: d.find_element(By.ID, "model-info").text and d.find_element(By.ID, "model-info"))
        assert "Flickr8k photos of people, animals, outdoor scenes" in info.text
        assert "template voices, a proxy for Personality-Captions" in info.text and "10 personalities" in info.text
        images[1].click()
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sarcastic"] input').click()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
        result = browser.find_element(By.CSS_SELECTOR, "#results .result")
        assert result.find_element(By.TAG_NAME, "h3").text == "Sarcastic"
        assert len(result.find_elements(By.CSS_SELECTOR, "li.caption")) == 5
