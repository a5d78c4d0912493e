"""A model trained without personalities: the API and the page say so and rank for the photo alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import image_bytes


@pytest.fixture(scope="module")
def plain_client(plain_settings) -> Iterator:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    with TestClient(create_app(plain_settings)) as client:
        yield client


def test_the_personality_list_says_there_are_none(plain_client) -> None:
    body = plain_client.get("/v1/personalities").json()
    assert body["count"] == 0 and body["personalities"] == []
    assert "no personalities" in body["message"]


@pytest.mark.parametrize("as_json", [False, True])
def test_a_request_without_personality_ranks_for_the_photo_alone(plain_client, as_json: bool) -> None:
    import base64

    data = image_bytes()
    if as_json:
        response = plain_client.post("/v1/captions", json={"image_base64": base64.b64encode(data).decode(), "k": 3})
    else:
        response = plain_client.post("/v1/captions", files={"image": ("a.jpg", data, "image/jpeg")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["personality"] == "none" and len(result["captions"]) == 3


def test_a_model_with_personalities_still_asks_for_one(service_client) -> None:
    response = service_client.post("/v1/captions", files={"image": ("a.jpg", image_bytes(), "image/jpeg")})
    assert response.status_code == 422
    assert "missing field 'personality'" in response.json()["message"]
    assert "/v1/personalities" in response.json()["message"]
