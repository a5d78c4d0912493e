"""Test-time augmentation (``model.image.tta``): features averaged over the centre crop and its mirror, the
same in the evaluator and the service, keyed apart in the feature cache, and off for old checkpoints."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.helpers import ADMIN_TOKEN, TINY_TRAITS, build_test_index, random_pixels, tiny_tree
from transresnet import cli
from transresnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from transresnet.config import build_config
from transresnet.encode import encode_queries
from transresnet.evaluate import image_features, query_vectors
from transresnet.features import CACHE_FORMAT, cache_key, cached_features, pooled_features
from transresnet.images import ImagePreprocessor
from transresnet.model import create_model
from transresnet.traits import TraitVocab


@pytest.fixture(scope="module")
def flip_checkpoint(tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The tiny model with flip test-time augmentation in its config."""
    tree = tiny_tree(tiny_text_model)
    tree["model"]["image"]["tta"] = "flip"
    config = build_config(tree)
    torch.manual_seed(0)
    model = create_model(config.model, TraitVocab(TINY_TRAITS))
    return load_checkpoint(save_checkpoint(model, config, tmp_path_factory.mktemp("flip") / "best"))


def square_photo(tmp_path: Path, seed: int = 0) -> Path:
    """A square photo: its centre crop is the whole resized image, so the mirror's crop is the crop's mirror."""
    path = tmp_path / f"photo{seed}.png"
    Image.fromarray(random_pixels((40, 40), seed)).save(path)
    return path


def test_flip_features_are_the_mean_of_the_photo_and_its_mirror(flip_checkpoint: Checkpoint, tmp_path: Path) -> None:
    model = flip_checkpoint.model.eval()
    preprocessor = ImagePreprocessor(flip_checkpoint.config.model.image)
    photo = Image.open(square_photo(tmp_path)).convert("RGB")
    pixels, mirrored = preprocessor(photo)[None], preprocessor(ImageOps.mirror(photo))[None]
    with torch.inference_mode():
        separately = (model.backbone(pixels) + model.backbone(mirrored)) / 2
        averaged = model.encode_image(pixels)
        single = model.encode_image(pixels, tta="none")
    torch.testing.assert_close(averaged, separately, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(averaged, single, atol=1e-4)  # the mirror really changed the features


def test_a_config_without_the_option_gives_exactly_the_old_features(tiny_checkpoint: Checkpoint) -> None:
    assert "tta" not in tiny_tree(Path("x"))["model"]["image"]  # the fixture's config never names it
    model = tiny_checkpoint.model.eval()
    assert model.config.image.tta == "none"
    pixels = torch.from_numpy(random_pixels((32, 32), 3)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        assert torch.equal(model.encode_image(pixels), model.backbone(pixels))
        assert torch.equal(pooled_features(model.backbone, pixels), model.backbone(pixels))


def test_the_cache_key_names_the_views_and_old_keys_stay(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    cfg = tiny_checkpoint.config.model.image
    preprocessor = ImagePreprocessor(cfg)
    old_parts = {"format": CACHE_FORMAT, "backbone": cfg.backbone, "kwargs": cfg.backbone_kwargs, "weights": "w",
                 "preprocess": preprocessor.identity(), "view": 0}
    old_key = hashlib.sha256(json.dumps(old_parts, sort_keys=True).encode()).hexdigest()[:20]
    assert cache_key(cfg, preprocessor, weights="w") == old_key
    assert cache_key(cfg, preprocessor, weights="w", tta="flip") != old_key

    paths = [square_photo(tmp_path, seed) for seed in range(3)]
    backbone = tiny_checkpoint.model.backbone.eval()
    root = tmp_path / "features"
    single = cached_features(backbone, cfg, paths, root=root, weights="w", views=2)
    flipped = cached_features(backbone, cfg, paths, root=root, weights="w", views=2, tta="flip")
    assert len(list(root.iterdir())) == 3  # centre crop single, centre crop flip, one shared random crop
    np.testing.assert_array_equal(flipped[:, 1], single[:, 1])  # random crops never average views
    assert not np.allclose(flipped[:, 0], single[:, 0], atol=1e-4)
    pixels = torch.stack([preprocessor.load(p) for p in paths])
    with torch.inference_mode():
        expected = pooled_features(backbone, pixels, "flip").numpy()
    np.testing.assert_allclose(flipped[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_the_service_and_the_evaluator_give_the_same_query(flip_checkpoint: Checkpoint, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from transresnet.index import load_index
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    photo = square_photo(tmp_path, seed=5)
    root = tmp_path / "index"
    build_test_index(flip_checkpoint, root)
    caption_index = load_index(root, checkpoint=flip_checkpoint)
    slot = flip_checkpoint.traits.lookup("Sweet")
    features = image_features(flip_checkpoint, [photo], feature_cache=tmp_path / "features", batch_size=8)
    query = query_vectors(flip_checkpoint, features, [slot], 8)
    k = len(caption_index)
    expected = caption_index.search(query, k)[0]

    settings = ServiceSettings(_env_file=None, checkpoint=flip_checkpoint.path, index_root=root,
                               admin_token=ADMIN_TOKEN, device="cpu")
    buffer = io.BytesIO()
    Image.open(photo).save(buffer, format="PNG")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz").json()
        response = client.post("/v1/captions", data={"personality": ["Sweet"], "k": str(k)},
                               files={"image": ("photo.png", buffer.getvalue(), "image/png")})
    assert "test_resnet image encoder with flip test-time augmentation" in ready["model"]["description"]
    assert response.status_code == 200, response.text
    served = {c["id"]: c["score"] for c in response.json()["results"][0]["captions"]}
    np.testing.assert_allclose([served[h.id] for h in expected], [h.score for h in expected], rtol=1e-4, atol=1e-4)
    # ... and not the single-view query, so the comparison above would catch a service without the mirror
    pixels = ImagePreprocessor(flip_checkpoint.config.model.image).load(photo)[None]
    with torch.inference_mode():
        single = encode_queries(flip_checkpoint.model, [slot], features=flip_checkpoint.model.encode_image(
            pixels, tta="none"))
    single_scores = {h.id: h.score for h in caption_index.search(single, k)[0]}
    assert max(abs(served[i] - single_scores[i]) for i in served) > 1e-3


def test_eval_overrides_the_checkpoints_views(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    rows = ["image,split,caption,personality"]
    for i in range(4):
        Image.fromarray(random_pixels((40, 40), i)).save(folder / "images" / f"p{i}.png")
        rows += [f"p{i}.png,val,caption number {i},Sweet", f"p{i}.png,val,another one {i},Sweet"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    reports = {}
    for tta in ("none", "flip"):
        out = tmp_path / tta
        assert cli.main(["eval", "--checkpoint", str(tiny_checkpoint.path), "--data", str(folder / "captions.csv"),
                         "--split", "val", "--index-type", "flat", "--out", str(out), "--tta", tta,
                         "--feature-cache", str(tmp_path / "features"), "--device", "cpu"]) == 0
        reports[tta] = json.loads((out / "eval.json").read_text())
    assert reports["flip"]["image_encoder"]["tta"] == "flip" and reports["none"]["image_encoder"]["tta"] == "none"
    assert "test-time views: flip" in (tmp_path / "flip" / "eval.md").read_text()
    assert len(list((tmp_path / "features").iterdir())) == 2  # cached apart


def test_training_reads_single_view_features_whatever_the_option(flip_checkpoint: Checkpoint, tmp_path: Path) -> None:
    from transresnet.features import weights_identity
    from transresnet.train import ImageInputs

    config = flip_checkpoint.config.model_copy(deep=True)
    config.data.feature_cache = str(tmp_path / "features")
    paths = [square_photo(tmp_path, seed) for seed in range(3)]
    model = flip_checkpoint.model
    inputs = ImageInputs(model, config, paths, torch.device("cpu"))
    single = cached_features(model.backbone, config.model.image, paths, root=tmp_path / "features",
                             weights=weights_identity(config.model.image), views=1 + config.data.augment_crops)
    np.testing.assert_array_equal(inputs.cached.numpy(), single)  # the same cache, no averaged view
    np.testing.assert_array_equal(inputs.features([0, 1, 2], train=False).numpy(), single[:, 0])


def test_eval_refuses_views_for_caption_generators() -> None:
    from pydantic import ValidationError

    from transresnet.options import EvalOptions

    with pytest.raises(ValidationError, match="--tta applies to retrieval"):
        EvalOptions(checkpoint=Path("c"), data=Path("d"), protocol="generate", tta="flip")
