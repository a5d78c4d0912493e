"""benchmarks/generate_table.py's row machinery on a tiny generator: rows train through the project's trainer,
are scored by ``eval --protocol generate``, carry the metric keys and commands in the JSON, beam variants
share one training, and a rerun takes every row from the cache without training again."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def generate_table():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("generate_table")
    finally:
        sys.path.remove(str(BENCHMARKS))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(dataset: Path, cache: Path, out: Path) -> Path:
    """A one-epoch UpDown over a frozen random-init test_resnet at 32 px, on the synthetic voices."""
    tree = {
        "name": "tiny-table",
        "model": {
            "family": "updown",
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "freeze_backbone": True,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "personality": {"traits_file": str(dataset.parent / "personalities.txt")},
            "decoder": {"cell": "lstm", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 16, "attention_dim": 16,
                        "trait_dim": 8, "dropout": 0.0, "vocab": {"min_count": 1},
                        "decoding": {"beam_size": 2, "max_length": 16}},
        },
        "data": {"train": str(dataset), "train_split": "train", "val_split": "val", "feature_cache": str(cache)},
        "train": {"epochs": 1, "batch_size": 200, "lr": 0.01, "device": "cpu", "seed": 0, "patience": 2},
    }
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_rows_are_trained_scored_and_cached(generate_table, synthetic_dataset: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gt = generate_table
    config = str(tiny_config(synthetic_dataset, tmp_path / "cache", tmp_path))
    data = str(synthetic_dataset)
    specs = [gt.RowSpec("tiny", "tiny UpDown", config=config, run="tiny", data=data, split="test"),
             gt.RowSpec("tiny-beam1", "its model, beam 1", config=config, run="tiny", data=data, split="test",
                        beam_size=1),
             gt.RowSpec("tiny-nopers", "without the personality encoder", config=config, run="tiny_nopers",
                        overrides=("model.personality.enabled=false",), data=data, split="test")]
    out = tmp_path / "table.json"
    ctx = gt.Context(runs=tmp_path / "runs", adopt_from=None, device="cpu")
    trained: list[str] = []
    real_train = gt.train_row

    def counting_train(spec, context):
        trained.append(spec.name)
        return real_train(spec, context)

    monkeypatch.setattr(gt, "train_row", counting_train)
    rows = gt.run_rows(specs, ctx, out)
    assert trained == ["tiny", "tiny-nopers"]  # the beam variant decodes the first row's model

    saved = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(saved) == ["tiny", "tiny-beam1", "tiny-nopers"]
    for name, row in saved.items():
        for key in ("bleu_1", "bleu_4", "rouge_l", "cider_d", "distinct_words", "novel_pct", "voice_accuracy"):
            assert key in row["metrics"], (name, key)
        assert row["commands"][0].startswith("transresnet train --config")
        assert "--protocol generate" in row["commands"][-1]
        assert row["training"]["epochs_run"] == 1
    assert saved["tiny-beam1"]["decoding"]["beam_size"] == 1 and "--beam-size 1" in saved["tiny-beam1"]["commands"][-1]
    assert saved["tiny"]["checkpoint"] == saved["tiny-beam1"]["checkpoint"]
    assert "model.personality.enabled=false" in saved["tiny-nopers"]["commands"][0]
    assert rows["tiny"]["metrics"] == saved["tiny"]["metrics"]

    # A rerun: every row from the cache, nothing trained or scored again.
    monkeypatch.setattr(gt, "score_generator", lambda *a, **k: pytest.fail("a cached row was scored again"))
    trained.clear()
    again = gt.run_rows(specs, gt.Context(runs=tmp_path / "runs", adopt_from=None, device="cpu"), out)
    assert trained == [] and all(again[s.name]["cached"] for s in specs)
    assert again["tiny"]["metrics"] == saved["tiny"]["metrics"]

    # Another epoch budget is another config: it trains its own run folder.
    monkeypatch.setattr(gt, "score_generator", lambda spec, ckpt, c: ({"bleu_1": 0.0}, ["transresnet", "eval"]))
    gt.run_rows(specs[:1], gt.Context(runs=tmp_path / "runs", adopt_from=None, device="cpu", epochs=2), out)
    assert trained == ["tiny"] and (tmp_path / "runs" / "tiny_e2" / "best").is_dir()


@pytest.mark.slow
def test_a_finished_run_elsewhere_with_the_same_config_is_adopted(generate_table, synthetic_dataset: Path,
                                                                  tmp_path: Path) -> None:
    gt = generate_table
    config = tiny_config(synthetic_dataset, tmp_path / "cache", tmp_path)
    spec = gt.RowSpec("tiny", "tiny UpDown", config=str(config), run="tiny", data=str(synthetic_dataset))
    elsewhere = tmp_path / "runs" / "by_hand"
    from transresnet.config import load_config
    from transresnet.generation.train import train_generator

    train_generator(load_config(config), elsewhere)
    ctx = gt.Context(runs=tmp_path / "runs" / "table", adopt_from=tmp_path / "runs", device="cpu")
    assert gt.finished_run(spec, ctx) == elsewhere
    changed = gt.Context(runs=ctx.runs, adopt_from=ctx.adopt_from, device="cpu", epochs=3)
    assert gt.finished_run(spec, changed) is None


def test_unknown_rows_are_named(generate_table) -> None:
    with pytest.raises(SystemExit, match="unknown row"):
        generate_table.select(["updown", "nope"])
    assert [s.name for s in generate_table.select(["updown-beam5"])] == ["updown-beam5"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_generators() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml")
                  if (yaml.safe_load(p.read_text())["model"].get("family") or "retrieval") != "retrieval")


def tiny_overrides(path: Path, dataset: Path, cache: Path) -> list[str]:
    """The shipped config with its decoder options kept, shrunk onto the tiny synthetic data: a random
    test_resnet at 32 px, small widths, one epoch (and two pretraining chunks where it pretrains)."""
    tree = yaml.safe_load(path.read_text())
    sets = ["model.image.backbone=test_resnet", "model.image.weights=null", "model.image.backbone_kwargs={}",
            "model.image.image_size=32", "model.image.resize_size=32", "model.decoder.embed_dim=16",
            "model.decoder.hidden_dim=32", "model.decoder.feature_dim=16", "model.decoder.attention_dim=16",
            "model.decoder.trait_dim=8", "model.decoder.vocab.min_count=1", "model.decoder.decoding.beam_size=2",
            f"data.train={dataset}", "data.train_split=train", "data.val_split=val", "data.synthesize=null",
            f"data.feature_cache={cache}", "train.epochs=1", "train.batch_size=200", "train.device=cpu"]
    if tree["model"].get("personality", {}).get("enabled", True):
        sets.append(f"model.personality.traits_file={dataset.parent / 'personalities.txt'}")
    if tree.get("train", {}).get("pretrain", {}).get("captions"):
        sets += [f"train.pretrain.captions={dataset}", "train.pretrain.epochs=1",
                 "train.pretrain.max_steps_per_epoch=2"]
    return sets


def test_every_shipped_generator_config_is_listed() -> None:
    names = {p.stem for p in shipped_generators()}
    assert {"flickr8k_showtell", "flickr8k_showatttell", "flickr8k_updown", "synthetic_updown",
            "synthetic_showtell", "synthetic_showatttell"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", shipped_generators(), ids=lambda p: p.stem)
def test_each_shipped_generator_config_trains_in_tiny_form(path: Path, synthetic_dataset: Path,
                                                           tmp_path: Path) -> None:
    from transresnet.config import load_config
    from transresnet.generation.train import train_generator

    config = load_config(path, tiny_overrides(path, synthetic_dataset, tmp_path / "cache"))
    shipped = load_config(path)
    assert config.model.family == shipped.model.family and config.model.decoder.cell == shipped.model.decoder.cell
    result = train_generator(config, tmp_path / "run")
    assert (result.best_checkpoint / "model.safetensors").is_file()
    assert {"bleu_4", "cider_d"} <= set(result.report["val"])
    if shipped.train.pretrain.captions:
        assert result.report["pretrain"]["captions"] > 0
