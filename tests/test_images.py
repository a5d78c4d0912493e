"""The one image path: decode rules, and the same pixels over HTTP, on the command line and in the cache."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transresnet.service.imaging import decode_image

from tests.helpers import ServerThread, free_port, image_bytes, random_pixels
from transresnet import cli
from transresnet.checkpoint import Checkpoint
from transresnet.features import cached_features, weights_identity
from transresnet.images import BACKGROUND, DECODE_VERSION, ImagePreprocessor, load_rgb, to_rgb
from transresnet.runtime import eval_mode

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 10_000_000}


def rotated_jpeg(size: tuple[int, int] = (48, 30)) -> bytes:
    """A landscape JPEG whose EXIF says: rotate 90 degrees clockwise to display (a phone held upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes("JPEG", size=size, seed=3, exif=exif)


def rgba_png(size: tuple[int, int] = (40, 30)) -> bytes:
    """Random colours, the left half fully transparent."""
    pixels = random_pixels(size, seed=4, channels=4)
    pixels[:, : size[0] // 2, 3] = 0
    pixels[:, size[0] // 2:, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def cmyk_jpeg(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(size, seed=5)).convert("CMYK").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


PHOTOS = {"exif-rotated.jpg": rotated_jpeg, "transparent.png": rgba_png, "cmyk.jpg": cmyk_jpeg}


# ----------------------------------------------------------------------------------- decode rules


def test_exif_orientation_is_applied() -> None:
    data = rotated_jpeg()
    img = load_rgb(data)
    assert img.size == (30, 48)
    with Image.open(io.BytesIO(data)) as raw:
        expected = ImageOps.exif_transpose(raw).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(expected))


def test_transparency_is_composited_on_the_documented_background() -> None:
    img = np.asarray(load_rgb(rgba_png()))
    assert img.shape == (30, 40, 3)
    assert (img[:, :20] == BACKGROUND).all()  # transparent half: the background
    opaque = random_pixels((40, 30), seed=4, channels=4)[:, 20:, :3]
    assert np.array_equal(img[:, 20:], opaque)  # opaque half: the pixels as they are


def test_palette_transparency_and_grey_alpha_are_composited_too() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.info["transparency"] = 1
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=1)
    assert (np.asarray(load_rgb(buffer.getvalue())) == BACKGROUND).all()
    grey = Image.new("LA", (4, 4), (10, 0))
    assert (np.asarray(to_rgb(grey)) == BACKGROUND).all()


def test_cmyk_and_greyscale_become_rgb() -> None:
    cmyk = load_rgb(cmyk_jpeg())
    assert cmyk.mode == "RGB" and cmyk.size == (40, 30)
    reference = random_pixels((40, 30), seed=5).astype(np.int16)
    assert np.abs(np.asarray(cmyk, dtype=np.int16) - reference).mean() < 12  # JPEG loss only
    grey = to_rgb(Image.new("L", (6, 5), 77))
    assert grey.mode == "RGB" and (np.asarray(grey) == 77).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    img = load_rgb(buffer.getvalue())
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]


def test_animated_images_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first = np.asarray(load_rgb(buffer.getvalue()))
    assert first[..., 0].mean() > 200 and first[..., 1].mean() < 50


def test_large_jpegs_are_decoded_at_reduced_scale_on_every_path() -> None:
    data = image_bytes("JPEG", size=(1600, 1200))
    core = load_rgb(data, min_side=100)
    served = decode_image(data, **LIMITS, min_side=100)
    assert 200 <= min(core.size) < 1200 and np.array_equal(np.asarray(core), np.asarray(served))


def test_the_decode_rules_are_part_of_the_feature_cache_key(tiny_checkpoint: Checkpoint,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import transresnet.images as images

    preprocessor = ImagePreprocessor(tiny_checkpoint.config.model.image)
    before = preprocessor.identity()
    monkeypatch.setattr(images, "DECODE_VERSION", DECODE_VERSION + 1)
    assert preprocessor.identity() != before


# ------------------------------------------------------------------ the same pixels on every path


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = {}
    for name, make in PHOTOS.items():
        files[name] = folder / name
        files[name].write_bytes(make())
    return files


@pytest.fixture(scope="module")
def server(service_settings) -> ServerThread:
    from transresnet.service.main import create_app

    with ServerThread(create_app(service_settings), free_port()) as running:
        yield running


def _cli_ranking(checkpoint: Checkpoint, index_root: Path, image: Path, capsys: pytest.CaptureFixture[str]
                 ) -> list[tuple[str, float]]:
    capsys.readouterr()
    assert cli.main(["index", "query", "--checkpoint", str(checkpoint.path), "--index", str(index_root),
                     "--image", str(image), "--personality", "Sweet", "-k", "5", "--json"]) == 0
    return [(hit["id"], hit["score"]) for hit in json.loads(capsys.readouterr().out)]


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_http_and_command_line_rank_a_photo_alike(name: str, photo_files: dict[str, Path], server: ServerThread,
                                                  tiny_checkpoint: Checkpoint, service_index_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = photo_files[name]
    response = httpx.post(f"{server.base_url}/v1/captions", files={"image": (name, path.read_bytes())},
                          data={"personality": "Sweet", "k": "5"}, timeout=30)
    assert response.status_code == 200, response.text
    served = [(c["id"], c["score"]) for c in response.json()["results"][0]["captions"]]
    expected = _cli_ranking(tiny_checkpoint, service_index_root, path, capsys)
    assert [i for i, _ in served] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in served], [s for _, s in expected], rtol=1e-5, atol=1e-5)


def test_the_service_decode_gives_the_features_the_cache_holds(photo_files: dict[str, Path],
                                                                tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    cfg = tiny_checkpoint.config.model.image
    backbone = tiny_checkpoint.model.backbone
    preprocessor = ImagePreprocessor(cfg)
    paths = [photo_files[name] for name in sorted(PHOTOS)]
    cached = cached_features(backbone, cfg, paths, root=tmp_path, weights=weights_identity(cfg))[:, 0]
    for row, path in enumerate(paths):
        image = decode_image(path.read_bytes(), **LIMITS, min_side=preprocessor.min_side)
        with torch.inference_mode(), eval_mode(backbone):
            live = backbone(preprocessor(image)[None]).numpy()[0]
        np.testing.assert_allclose(live, cached[row], rtol=1e-5, atol=1e-5)
