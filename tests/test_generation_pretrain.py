"""Language-model pretraining of the caption decoders: the truncated-BPTT stream, the no-image path, a
pretrained LM beating an untrained one on held-out captions (word and char level), and the guard that keeps
captions of val/test images out of the pool, enforced on the training path."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import SUBJECTS, VOICES
from tests.test_generation_train import generator_tree
from transresnet.config import DecoderConfig, PretrainConfig, build_config
from transresnet.data import load_dataset
from transresnet.generation.data import bptt_chunks, exclude_images, image_keys, parallel_streams, token_stream
from transresnet.generation.models import create_decoder
from transresnet.generation.pretrain import (
    held_out_records,
    load_pool,
    no_image_context,
    pretrain_decoder,
    stream_perplexity,
)
from transresnet.generation.vocab import BOS_ID, EOS_ID, Vocabulary
from transresnet.train import list_states

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _captions() -> tuple[list[str], list[str]]:
    """Templated captions: every voice with every subject; two subjects' captions are the held-out text."""
    train = [v.format(s) for s in SUBJECTS[:-2] for v in VOICES.values()]
    held_out = [v.format(s) for s in SUBJECTS[-2:] for v in VOICES.values()]
    return train, held_out


def test_the_stream_is_captions_between_separators_cut_into_parallel_rows() -> None:
    vocab = Vocabulary.build(["a dog", "two cats"], min_count=1)
    stream = token_stream(["A dog!", "two cats"], vocab)
    dog, two, cats = (vocab.encode(w)[0] for w in ("dog", "two", "cats"))
    assert stream.tolist() == [BOS_ID, vocab.encode("a")[0], dog, EOS_ID, BOS_ID, two, cats, EOS_ID]
    rows = parallel_streams(torch.arange(11), 2)
    assert rows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # contiguous rows, remainder dropped
    chunks = bptt_chunks(rows, 3)
    assert [x.tolist() for x, _ in chunks] == [[[0, 1, 2], [5, 6, 7]], [[3], [8]]]
    assert [y.tolist() for _, y in chunks] == [[[1, 2, 3], [6, 7, 8]], [[4], [9]]]
    with pytest.raises(ValueError, match="batch_size"):
        parallel_streams(torch.arange(3), 2)


def test_held_out_images_match_by_file_name_and_stem() -> None:
    assert image_keys("images/ABC_1.jpg#2") == {"abc_1.jpg", "abc_1"}
    assert image_keys("abc_1") == {"abc_1"}
    from transresnet.data import CaptionRecord

    def rec(image: str) -> CaptionRecord:
        return CaptionRecord(image, Path(image), "a caption", None, "all")

    kept, excluded = exclude_images([rec("x.jpg"), rec("abc_1.jpg#0"), rec("ABC_1"), rec("sub/abc_1.png")],
                                    [rec("abc_1.jpg")])
    assert [r.image_id for r in kept] == ["x.jpg"] and excluded == 3


@pytest.mark.parametrize("family,cell,level", [("updown", "lstm", "word"), ("showtell", "rnn", "char"),
                                               ("showatttell", "gru", "word")])
def test_pretraining_lowers_held_out_perplexity(family: str, cell: str, level: str) -> None:
    train, held_out = _captions()
    vocab = Vocabulary.build(train + held_out, level=level, min_count=1)
    cfg = DecoderConfig(cell=cell, embed_dim=24, hidden_dim=64, feature_dim=16, attention_dim=8, trait_dim=4,
                        dropout=0.0)
    torch.manual_seed(0)
    decoder = create_decoder(family, cfg, vocab_size=len(vocab), grid_dim=8, trait_slots=3)
    bptt = 20 if level == "char" else 6
    before = stream_perplexity(decoder, held_out, vocab, bptt=bptt, batch_size=4)
    pretrain = PretrainConfig(captions="pool.csv", bptt=bptt, epochs=6 if level == "word" else 3, batch_size=4,
                              lr=0.01)
    history = pretrain_decoder(decoder, vocab, train, pretrain, held_out=held_out, grad_clip=5.0)
    after = stream_perplexity(decoder, held_out, vocab, bptt=bptt, batch_size=4)
    assert before > 0.8 * len(vocab)  # untrained: about uniform over the vocabulary
    assert after < before / 2.5
    assert [r["pretrain_epoch"] for r in history] == list(range(1, pretrain.epochs + 1))
    assert history[-1]["val_ppl"] == pytest.approx(after, rel=1e-3)
    assert history[-1]["train_ppl"] < history[0]["train_ppl"]


def test_the_no_image_context_gives_the_decoder_nothing_of_an_image() -> None:
    cfg = DecoderConfig(embed_dim=8, hidden_dim=16, feature_dim=12, attention_dim=8, trait_dim=4, dropout=0.0)
    decoder = create_decoder("updown", cfg, vocab_size=10, grid_dim=6, trait_slots=0)
    ctx = no_image_context(decoder, 3, torch.device("cpu"))
    assert ctx.trait is None and not ctx.mean.any() and ctx.cells.shape == (3, 1, 12) and not ctx.cells.any()
    _, alpha = decoder.attention(ctx.keys, ctx.cells, torch.randn(3, 16))
    assert torch.allclose(alpha, torch.ones(3, 1))


def _write_pool(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def test_the_pool_loses_every_caption_of_a_val_or_test_image(synthetic_dataset: Path, tmp_path: Path) -> None:
    records = load_dataset(synthetic_dataset).records
    by_split = {s: sorted({r.image_id for r in records if r.split == s}) for s in ("train", "val", "test")}
    rows = [(image, f"train caption {i}") for i, image in enumerate(by_split["train"][:20])]
    rows += [(image, f"val caption {i}") for i, image in enumerate(by_split["val"][:5])]
    rows += [(Path(image).stem + ".jpg#1", f"test caption {i}") for i, image in enumerate(by_split["test"][:5])]
    rows += [(f"images/{Path(image).stem}", f"test stem caption {i}") for i, image in enumerate(by_split["test"][:3])]
    rows += [("elsewhere_1.jpg", "a caption of another photo")]
    pool = _write_pool(tmp_path / "pool.csv", rows)
    config = build_config(generator_tree(synthetic_dataset, tmp_path / "cache",))
    val = load_dataset(synthetic_dataset, split="val").records
    # data.test is unset: the training file's test images are held out all the same.
    captions = load_pool(PretrainConfig(captions=str(pool)), held_out_records(config, val, []))
    assert captions.excluded == 13
    assert len(captions.captions) == 21 and not any("val" in c or "test" in c for c in captions.captions)


def test_training_pretrains_without_held_out_captions_then_fine_tunes(synthetic_dataset: Path,
                                                                      tmp_path: Path) -> None:
    from transresnet.generation.train import train_generator

    tree = generator_tree(synthetic_dataset, tmp_path / "cache")
    # The pool is the dataset's own file: its val and test captions must be left out.
    tree["train"].update(epochs=1, max_steps_per_epoch=2,
                         pretrain={"captions": str(synthetic_dataset), "bptt": 8, "epochs": 2, "batch_size": 16,
                                   "lr": 0.005, "max_steps_per_epoch": 15})
    result = train_generator(build_config(tree), tmp_path / "run")
    records = load_dataset(synthetic_dataset, require_images=False).records
    held = sum(r.split != "train" for r in records)
    summary = result.report["pretrain"]
    assert summary["excluded_held_out"] == held > 0 and summary["captions"] == len(records) - held
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pre = [r for r in lines if r.get("phase") == "pretrain"]
    assert [r["pretrain_epoch"] for r in pre] == [1, 2] and all(math.isfinite(r["val_ppl"]) for r in pre)
    assert pre[1]["val_ppl"] < pre[0]["val_ppl"]
    assert [r["epoch"] for r in lines if "epoch" in r] == [1]
    states = list_states(tmp_path / "run")
    assert [p.name.split("-")[1] for p in states] == ["0000", "0001"]
    progress = json.loads((states[0] / "train_state.json").read_text())["progress"]
    assert progress["pretrained"] and progress["epoch"] == 0

    # `transresnet train --resume` with one more epoch: it continues at epoch 2 and never pretrains again.
    import yaml

    from transresnet.cli import main

    config_file = tmp_path / "gen.yaml"
    config_file.write_text(yaml.safe_dump(tree))
    assert main(["train", "--config", str(config_file), "--out", str(tmp_path / "run"), "--resume",
                 "--set", "train.epochs=2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("pretrain_epoch", r.get("epoch")) for r in lines] == [1, 2, 1, 2]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["pretrain"] == summary
