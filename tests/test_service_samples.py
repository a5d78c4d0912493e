"""GET /v1/samples: photos like the training photos (the held-out ones where known), served from an allow-list,
and clickable on the page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import ServerThread, build_test_index, free_port, tiny_tree, write_image
from transresnet.checkpoint import load_checkpoint, save_checkpoint
from transresnet.config import build_config
from transresnet.model import create_model
from transresnet.traits import TraitVocab


@pytest.fixture(scope="module")
def sampled_settings(tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from transresnet.service.settings import ServiceSettings

    data = tmp_path_factory.mktemp("sampled") / "data"
    for i in range(20):
        write_image(data / "images" / f"photo_{i:02d}.jpg", size=(40, 30), seed=i)
    (data / "images" / "notes.txt").write_text("not a photo")
    config = build_config(tiny_tree(tiny_text_model, data={"train": str(data / "captions.csv")}))
    torch.manual_seed(0)
    model = create_model(config.model, TraitVocab(["Sweet", "Sarcastic"]))
    checkpoint = load_checkpoint(save_checkpoint(model, config, data.parent / "best"))
    build_test_index(checkpoint, data.parent / "index")
    return ServiceSettings(_env_file=None, checkpoint=checkpoint.path, index_root=data.parent / "index",
                           device="cpu")


@pytest.fixture(scope="module")
def sampled_client(sampled_settings) -> Iterator:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    with TestClient(create_app(sampled_settings)) as client:
        yield client


def test_samples_are_spread_over_the_training_photos_and_served(sampled_client) -> None:
    samples = sampled_client.get("/v1/samples").json()["samples"]
    names = [s["name"] for s in samples]
    assert len(names) == 8 and names[0] == "photo_00.jpg" and names[-1] > "photo_10.jpg"
    assert "notes.txt" not in names
    photo = sampled_client.get(samples[1]["url"])
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("name", ["photo_01.jpg", "notes.txt", "..%2F..%2Fbest%2Fmeta.json", "%2Fetc%2Fpasswd"])
def test_only_listed_samples_are_served(sampled_client, name: str) -> None:
    listed = {s["name"] for s in sampled_client.get("/v1/samples").json()["samples"]}
    response = sampled_client.get(f"/v1/samples/{name}")
    if name in listed:
        assert response.status_code == 200
    else:
        assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_the_samples_are_the_held_out_photos_where_the_training_data_has_them(tiny_text_model: Path,
                                                                             tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    data = tmp_path / "data"
    lines = ["image,split,caption"]
    for i in range(12):
        write_image(data / "images" / f"photo_{i:02d}.jpg", size=(40, 30), seed=i)
        lines.append(f"photo_{i:02d}.jpg,{'val' if i % 4 == 3 else 'train'},A photo number {i} .")
    (data / "captions.csv").write_text("\n".join(lines) + "\n")
    config = build_config(tiny_tree(tiny_text_model, data={"train": str(data / "captions.csv")}))
    model = create_model(config.model, TraitVocab(["Sweet"]))
    checkpoint = load_checkpoint(save_checkpoint(model, config, tmp_path / "best"))
    build_test_index(checkpoint, tmp_path / "index")
    settings = ServiceSettings(_env_file=None, checkpoint=checkpoint.path, index_root=tmp_path / "index",
                               device="cpu")
    with TestClient(create_app(settings)) as client:
        names = [s["name"] for s in client.get("/v1/samples").json()["samples"]]
        assert names == ["photo_03.jpg", "photo_07.jpg", "photo_11.jpg"]  # the val split, not trained on
        assert client.get("/v1/samples/photo_00.jpg").status_code == 404


def test_a_model_whose_training_photos_are_elsewhere_offers_none(service_client) -> None:
    assert service_client.get("/v1/samples").json() == {"samples": []}


@pytest.mark.browser
def test_clicking_a_sample_ranks_it(browser, sampled_settings) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from transresnet.service.main import create_app

    with ServerThread(create_app(sampled_settings), free_port()) as server:
        wait = WebDriverWait(browser, 20)
        browser.get(server.base_url + "/")
        wait.until(lambda d: d.find_element(By.ID, "samples").is_displayed())
        buttons = browser.find_elements(By.CSS_SELECTOR, "#sample-list button.sample")
        assert len(buttons) == 8
        buttons[2].click()
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        browser.find_element(By.CSS_SELECTOR, '#trait-list li[data-trait="Sweet"] input').click()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
        assert browser.find_element(By.CSS_SELECTOR, "#results .result h3").text == "Sweet"
