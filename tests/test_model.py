"""Every shipped config builds, trains a step and round-trips through a checkpoint (tiny random weights)."""

from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS_DIR, TINY_TRAITS, shared_path
from transresnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transresnet.config import load_config
from transresnet.loss import InBatchSoftmaxLoss
from transresnet.model import create_model
from transresnet.runtime import eval_mode
from transresnet.traits import TraitVocab

CAPTIONS = ["a red circle", "two blue squares", "what a gloomy triangle", "three happy stars"]


def tiny_version(path: Path, text_model: Path):
    """The config's architecture with a small backbone, a one-layer BERT and no weight files."""
    overrides = ["model.image.backbone=test_resnet", "model.image.backbone_kwargs={}", "model.image.weights=null",
                 "model.image.pretrained=false", "model.image.image_size=32", "model.image.resize_size=32",
                 "model.personality.traits_file=null", "model.hidden_dim=16", f"model.text.model={text_model}",
                 "model.text.bow_embed_dim=8"]
    return load_config(path, overrides)


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_forward_backward_and_round_trip(path: Path, tiny_text_model: Path, tmp_path: Path) -> None:
    config = tiny_version(path, tiny_text_model)
    torch.manual_seed(0)
    model = create_model(config.model, TraitVocab(TINY_TRAITS), captions=CAPTIONS)
    model.train()
    images = torch.randn(4, 3, 32, 32)
    traits = torch.tensor([1, 2, 0, 4])
    queries = model.encode_query(images=images, trait_ids=traits)
    captions = model.encode_text(CAPTIONS)
    assert queries.shape == captions.shape == (4, 16)
    loss = InBatchSoftmaxLoss()(model.logits(queries, captions), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.image_mlp.layers[-1].weight.grad is not None
    assert model.text.head[-1].weight.grad is not None
    frozen = config.model.image.freeze_backbone
    assert all((p.grad is None) == frozen for p in model.backbone.parameters())

    saved = save_checkpoint(model, config, tmp_path / "ckpt")
    loaded = load_checkpoint(saved)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_text(CAPTIONS), model.encode_text(CAPTIONS), atol=1e-5)
        assert torch.allclose(loaded.model.encode_query(images=images, trait_ids=traits),
                              model.encode_query(images=images, trait_ids=traits), atol=1e-5)


def test_personality_changes_the_query(tiny_checkpoint) -> None:
    model = tiny_checkpoint.model
    features = torch.randn(1, model.backbone.num_features).repeat(2, 1)
    with torch.no_grad():
        q = model.encode_query(features=features, trait_ids=torch.tensor([1, 2]))
    assert not torch.allclose(q[0], q[1])


def test_encode_query_needs_exactly_one_input(tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        tiny_checkpoint.model.encode_query(trait_ids=torch.tensor([0]))


def test_missing_checkpoint_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="transresnet train"):
        load_checkpoint(tmp_path / "nope")


def test_mismatched_backbone_weights_file(tmp_path: Path, tiny_config) -> None:
    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, str(bogus))
    config = tiny_config.model.model_copy(deep=True)
    config.image.weights = str(bogus)
    with pytest.raises(ValueError, match="do not fit backbone"):
        create_model(config, TraitVocab(TINY_TRAITS))


@pytest.mark.shared
def test_real_mobilenet_weights_recognise_a_dog() -> None:
    """The shared MobileNetV2 weights load strictly and classify a real Flickr8k photo of a dog."""
    import timm

    from transresnet.config import ImageEncoderConfig
    from transresnet.images import ImagePreprocessor

    weights = shared_path("weights", "mobilenetv2_100_imagenet.safetensors")
    image = shared_path("data", "flickr8k-1k", "images", "1009434119_febe49276a.jpg")
    cfg = ImageEncoderConfig(backbone="mobilenetv2_100", backbone_kwargs={"pad_type": "same"}, weights=str(weights),
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = timm.create_model("mobilenetv2_100", pad_type="same")
    from transresnet.encoders import load_weights_file

    model.load_state_dict(load_weights_file(weights), strict=True)
    model.eval()
    with torch.no_grad():
        top5 = model(ImagePreprocessor(cfg).load(image).unsqueeze(0)).topk(5).indices[0].tolist()
    assert any(151 <= c <= 268 for c in top5), f"no dog class in top-5 {top5}"  # ImageNet dog breeds


@pytest.mark.shared
def test_real_minilm_matches_sentence_transformers() -> None:
    """Mean pooling over non-padding tokens reproduces sentence-transformers' MiniLM embeddings."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from transresnet.config import TextEncoderConfig
    from transresnet.encoders import TransformerTextEncoder, resolve_text_model

    texts = ["A dog runs through the grass .", "Two children sit on a bench eating ice cream ."]
    encoder = TransformerTextEncoder(TextEncoderConfig(max_length=256), hidden_dim=8).eval()
    with torch.no_grad():
        ours = torch.nn.functional.normalize(encoder.pool(texts), dim=-1)
    reference = SentenceTransformer(resolve_text_model("all-MiniLM-L6-v2"), device="cpu").encode(
        texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference.float(), atol=1e-4)


def test_a_text_model_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    from transresnet.encoders import resolve_text_model

    with pytest.raises(FileNotFoundError, match="text model folder .* not found"):
        resolve_text_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_text_model("./models/minilm")
    assert resolve_text_model("sentence-transformers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    assert Path(resolve_text_model("all-MiniLM-L6-v2")).is_dir()  # the bundled package, never the hub


def test_eval_mode_switches_a_training_model_and_restores_each_module() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    net.train()
    net[2].eval()  # a frozen part kept in eval by its owner, as TransResNet keeps a frozen backbone
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
        out = net(torch.ones(3, 2))
        assert torch.equal(out, net(torch.ones(3, 2)))  # dropout off: deterministic
    assert net.training and net[1].training
    net.eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert not any(m.training for m in net.modules())  # an eval model is left untouched


def test_eval_mode_restores_the_mode_after_an_error() -> None:
    net = torch.nn.Sequential(torch.nn.Dropout(0.5))
    net.train()
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training and net[0].training
