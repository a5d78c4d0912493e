"""Every endpoint and every kind of bad input, through FastAPI's TestClient."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from tests.helpers import ADMIN_TOKEN, assert_same_ranking, image_bytes, reference_ranking

JPEG = image_bytes("JPEG")


@pytest.fixture
def client(service_client):
    return service_client


def post_form(client, data: bytes | None = JPEG, personality=("Sweet",), k=None, filename="photo.jpg",
              content_type="image/jpeg"):
    fields: dict = {"personality": list(personality)}
    if k is not None:
        fields["k"] = str(k)
    files = {"image": (filename, data, content_type)} if data is not None else None
    return client.post("/v1/captions", data=fields, files=files)


def assert_error(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]
    return body


# ------------------------------------------------------------------------------------------ happy paths

def test_captions_multipart(client, tiny_checkpoint, service_index_root):
    response = post_form(client, personality=["Sweet"], k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 3
    [result] = body["results"]
    assert result["personality"] == "Sweet" and result["requested"] == "Sweet"
    assert len(result["captions"]) == 3
    scores = [c["score"] for c in result["captions"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timings"]) >= {"decode_ms", "encode_ms", "search_ms", "total_ms"}
    assert body["index"]["size"] == 40 and body["model"]["fingerprint"] == tiny_checkpoint.fingerprint
    assert_same_ranking(body, reference_ranking(tiny_checkpoint, service_index_root, JPEG, ["Sweet"], 3))


def test_several_personalities_one_list_each(client, tiny_checkpoint, service_index_root):
    traits = ["sarcastic", "SWEET", "none", "Cheerful"]
    response = post_form(client, personality=traits, k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["requested"] for r in body["results"]] == traits
    assert [r["personality"] for r in body["results"]] == ["Sarcastic", "Sweet", "none", "Cheerful"]
    assert_same_ranking(body, reference_ranking(tiny_checkpoint, service_index_root, JPEG, traits, 4))
    assert body["results"][0]["captions"] != body["results"][1]["captions"]


def test_default_k_is_five(client):
    body = post_form(client).json()
    assert body["k"] == 5 and len(body["results"][0]["captions"]) == 5


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_other_image_formats(client, fmt):
    response = post_form(client, image_bytes(fmt), filename=f"photo.{fmt.lower()}", content_type=f"image/{fmt.lower()}")
    assert response.status_code == 200, response.text


def test_rgba_and_grayscale_images(client):
    for mode in ("RGBA", "L", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, format="PNG")
        assert post_form(client, buffer.getvalue()).status_code == 200


def test_captions_json_base64(client, tiny_checkpoint, service_index_root):
    payload = {"image_base64": base64.b64encode(JPEG).decode(), "personality": ["Angry", "sweet"], "k": 2}
    response = client.post("/v1/captions", json=payload)
    assert response.status_code == 200, response.text
    assert_same_ranking(response.json(),
                        reference_ranking(tiny_checkpoint, service_index_root, JPEG, ["Angry", "sweet"], 2))


def test_json_accepts_single_personality_string_and_data_url(client):
    data_url = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    response = client.post("/v1/captions", json={"image_base64": data_url, "personality": "Sweet"})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["personality"] == "Sweet"


def test_k_larger_than_index_returns_all(client):
    body = post_form(client, k=100).json()
    assert len(body["results"][0]["captions"]) == 40


def test_personalities(client, tiny_checkpoint):
    body = client.get("/v1/personalities").json()
    assert [p["name"] for p in body["personalities"]] == tiny_checkpoint.traits.names
    assert body["count"] == 4 and "none" in body["none_aliases"]


def test_health_and_ready(client, tiny_checkpoint):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["model"]["fingerprint"] == tiny_checkpoint.fingerprint


def test_metrics(client):
    post_form(client)
    text = client.get("/metrics").text
    for stage in ("decode", "encode", "search"):
        assert f'transresnet_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'transresnet_batch_size_count{stage="encode"}' in text
    assert "transresnet_index_info{" in text
    assert 'transresnet_http_requests_total{method="POST",route="/v1/captions",status="200"}' in text


def test_metrics_label_every_route_by_its_template_and_export_process_metrics(client):
    for path in ("/openapi.json", "/docs", "/static/app.js", "/static/docs/swagger-ui.css", "/no/such/page"):
        client.get(path)
    text = client.get("/metrics").text
    for route, status in (("/openapi.json", 200), ("/docs", 200), ("/static/{path}", 200),
                          ("/static/docs/{path}", 200), ("unmatched", 404)):
        assert f'transresnet_http_requests_total{{method="GET",route="{route}",status="{status}"}}' in text, route
    assert "process_resident_memory_bytes" in text and "python_info{" in text and "python_gc_" in text


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200


def test_web_page(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="trait-list"' in page.text
    assert client.get("/static/app.js").status_code == 200


# ------------------------------------------------------------------------------------------ bad input

def test_non_image_bytes(client):
    assert_error(post_form(client, b"this is not an image at all", filename="notes.txt", content_type="text/plain"),
                 422, "invalid_image", "not an image")


def test_truncated_image(client):
    big = image_bytes("JPEG", size=(200, 160), seed=3)
    assert_error(post_form(client, big[: len(big) // 2]), 422, "invalid_image", "truncated")


def test_truncated_png(client):
    png = image_bytes("PNG", size=(64, 64))
    assert_error(post_form(client, png[: len(png) - 40], content_type="image/png"), 422, "invalid_image")


def test_zero_byte_file(client):
    assert_error(post_form(client, b""), 422, "invalid_image", "empty")


def test_image_over_byte_limit(client, service_settings):
    data = b"\xff\xd8" + b"\0" * (service_settings.max_upload_bytes + 10)
    assert_error(post_form(client, data), 413, "image_too_large", "limit")


def test_request_body_far_over_limit(client, service_settings):
    data = b"\0" * (3 * service_settings.max_upload_bytes)
    assert_error(post_form(client, data), 413, "payload_too_large")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels whose (tiny) data would decode to a huge image: a bomb."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 30000])
def test_decompression_bomb_refused_from_header(client, monkeypatch, service_settings, side):
    from PIL import ImageFile

    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    data = _png_header_only(side, side)
    assert len(data) < 2000
    body = assert_error(post_form(client, data, content_type="image/png"), 413, "image_too_large", "pixels")
    assert f"{service_settings.max_pixels:,}" in body["message"]
    assert not loads, "pixels were decoded before the pixel limit was checked"


def test_unknown_personality_lists_closest(client):
    body = assert_error(post_form(client, personality=["Sarcastc"]), 422, "unknown_personality", "sarcastc")
    assert body["suggestions"][0] == "Sarcastic"


def test_unknown_among_several(client):
    body = assert_error(post_form(client, personality=["Sweet", "Angrry", "Zzzz"]), 422, "unknown_personality")
    assert "Angry" in body["suggestions"] and "zzzz" in body["message"].lower()


@pytest.mark.parametrize("k", [0, -1, 101, "five", ""])
def test_k_out_of_range(client, k):
    body = assert_error(post_form(client, k=k), 422, "invalid_request", "k")
    assert body["problems"][0]["field"] == "k"


def test_missing_image(client):
    assert_error(post_form(client, None), 422, "invalid_request", "image")


def test_missing_personality(client):
    assert_error(post_form(client, personality=()), 422, "invalid_request", "personality")


def test_image_sent_as_text_field(client):
    response = client.post("/v1/captions", data={"image": "hello", "personality": "Sweet"},
                           files={"other": ("x.txt", b"x", "text/plain")})
    assert_error(response, 422, "invalid_request", "file upload")


def test_too_many_personalities(client, service_settings):
    assert_error(post_form(client, personality=["Sweet"] * (service_settings.max_personalities + 1)),
                 422, "invalid_request", "at most")


@pytest.mark.parametrize("content_type", ["text/plain", "image/jpeg", "application/octet-stream", None])
def test_wrong_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/captions", content=JPEG, headers=headers)
    assert_error(response, 415, "unsupported_media_type", "multipart/form-data")


def test_malformed_base64(client):
    response = client.post("/v1/captions", json={"image_base64": "not*base64!!", "personality": "Sweet"})
    assert_error(response, 422, "invalid_image", "base64")


def test_base64_of_non_image(client):
    response = client.post("/v1/captions", json={"image_base64": base64.b64encode(b"hello").decode(),
                                                 "personality": "Sweet"})
    assert_error(response, 422, "invalid_image")


def test_base64_over_limit(client, service_settings):
    payload = base64.b64encode(b"\0" * (service_settings.max_upload_bytes + 100)).decode()
    response = client.post("/v1/captions", json={"image_base64": payload, "personality": "Sweet"})
    assert response.status_code == 413, response.text


def test_json_missing_field_and_bad_json(client):
    body = assert_error(client.post("/v1/captions", json={"personality": "Sweet"}), 422, "invalid_request",
                        "image_base64")
    assert body["problems"][0]["field"] == "image_base64"
    assert_error(client.post("/v1/captions", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_request", "json")
    assert_error(client.post("/v1/captions", json=[1, 2]), 422, "invalid_request")
    assert_error(client.post("/v1/captions", json={"image_base64": "AAAA", "personality": "Sweet", "x": 1}),
                 422, "invalid_request", "x")


def test_malformed_multipart(client):
    response = client.post("/v1/captions", content=b"--nope\r\ngarbage",
                           headers={"content-type": "multipart/form-data; boundary=abc"})
    assert response.status_code in (400, 422), response.text
    assert "message" in response.json()


def test_not_found_and_method_not_allowed_are_json(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/captions"), 405, "method_not_allowed")


def test_server_still_up_after_bad_input(client):
    for data in (b"", b"garbage", JPEG[:100]):
        post_form(client, data)
    assert post_form(client).status_code == 200


# ------------------------------------------------------------------------------------------ admin

def test_reload_refused_without_token(client):
    assert_error(client.post("/v1/admin/reload"), 401, "unauthorized", "bearer")
    response = client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_reload_with_token(client):
    before = client.get("/readyz").json()["index"]["version"]
    response = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["previous_index"]["version"] == before and body["index"]["version"] == before


def test_reload_with_bad_checkpoint_keeps_serving(client, tiny_checkpoint):
    missing = tiny_checkpoint.path.parent / "missing"  # under the default reload roots, so it is tried
    response = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           json={"checkpoint": str(missing)})
    assert_error(response, 409, "reload_failed", "still serving")
    assert post_form(client).status_code == 200


def test_admin_disabled_without_configured_token(service_settings):
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    with TestClient(create_app(service_settings.model_copy(update={"admin_token": None}))) as other:
        assert_error(other.post("/v1/admin/reload"), 403, "admin_disabled", "TRANSRESNET_ADMIN_TOKEN")


# ------------------------------------------------------------------------------------------ API contract

def test_two_image_parts_are_422(client):
    files = [("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b.jpg", image_bytes(seed=1), "image/jpeg"))]
    response = client.post("/v1/captions", files=files, data={"personality": "Sweet"})
    assert_error(response, 422, "invalid_request", "2 'image' parts", "exactly one")


def test_openapi_example_is_a_valid_request(client):
    schema = client.get("/openapi.json").json()
    json_body = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    [example] = json_body["examples"]
    response = client.post("/v1/captions", json=example)
    assert response.status_code == 200, response.text


def test_openapi_documents_every_status_and_limit(client, service_settings):
    operation = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]
    assert {"200", "400", "413", "415", "422", "431", "503"} <= set(operation["responses"])
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    for media in operation["requestBody"]["content"].values():
        assert media["schema"]["properties"]["personality"]["maxItems"] == service_settings.max_personalities


def test_every_accepted_format_is_named_in_docs_and_errors(client):
    from PIL import features
    from transresnet.service.imaging import supported_formats

    formats = supported_formats()
    if features.check("avif"):
        assert "AVIF" in formats
    operation = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]
    image_doc = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["image"]
    message = post_form(client, b"not an image at all").json()["message"]
    for fmt in formats:
        assert fmt in image_doc["description"] and fmt in operation["description"]
        assert fmt.lower() in message.lower(), message
