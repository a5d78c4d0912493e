"""Training a caption generator: teacher forcing with cross entropy over cached grid features.

The backbone is frozen and its grid features come from the on-disk feature cache once; each epoch
shuffles the (image, trait, caption) examples, minimises the word cross entropy (optional label smoothing)
with clipped gradients, then captions the validation queries greedily and scores them. The best epoch by
val CIDEr-D is ``OUT/best``, the latest ``OUT/last``; training stops after ``train.patience`` epochs
without improvement. The report scores ``best`` with the config's decoding (beam search by default).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transresnet.checkpoint import WEIGHTS, load_weights
from transresnet.config import ExperimentConfig, dump_config
from transresnet.devices import resolve_device
from transresnet.generation.checkpoint import CaptionModel, save_generator
from transresnet.generation.data import Example, Query, build_examples, grid_features, group_queries, teacher_forcing
from transresnet.generation.evaluate import caption_rows, score_queries, voice_classifier
from transresnet.generation.vocab import PAD_ID, Vocabulary
from transresnet.progress import progress
from transresnet.train import build_traits, load_splits, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class GeneratorResult:
    out_dir: Path
    best_checkpoint: Path
    report: dict[str, Any]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross entropy per real token (padding ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing)


class GeneratorTrainer:
    def __init__(self, config: ExperimentConfig, out_dir: Path) -> None:
        self.config = config
        self.out_dir = out_dir
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)
        self.train_records, val_records, _ = load_splits(config)
        vocab_cfg = config.model.decoder.vocab
        vocab = Vocabulary.build([r.caption for r in self.train_records], level=vocab_cfg.level,
                                 min_count=vocab_cfg.min_count, max_size=vocab_cfg.max_size)
        traits = build_traits(config, self.train_records)
        self.model = CaptionModel(config, vocab, traits).to(self.device)
        paths = list(dict.fromkeys(r.image_path for r in (*self.train_records, *val_records)))
        self.image_rows = {p: i for i, p in enumerate(paths)}
        self.features = grid_features(self.model, paths, root=config.data.feature_cache,
                                      num_workers=config.train.num_workers)
        slots = self.model.trait_slots([r.personality for r in self.train_records])
        self.examples = build_examples(self.train_records, self.image_rows, slots, vocab, vocab_cfg.max_tokens)
        self.val_queries = group_queries(val_records)
        self.val_slots = self.model.trait_slots([q.trait for q in self.val_queries])
        self.optimizer = torch.optim.Adam(self.model.decoder.parameters(), lr=config.train.lr,
                                          weight_decay=config.train.weight_decay)
        logger.info("%s decoder (%s): %d examples over %d images, vocabulary %d %ss, %d traits; val %d queries, "
                    "grid %s, on %s", config.model.family, config.model.decoder.cell, len(self.examples),
                    len({e.image_row for e in self.examples}), len(vocab), vocab.level, len(traits) - 1,
                    len(self.val_queries), tuple(self.features.shape[1:]), self.device)

    def _batches(self, epoch: int) -> list[list[Example]]:
        rng = random.Random(self.config.train.seed * 100_003 + epoch)
        order = list(self.examples)
        rng.shuffle(order)
        size = self.config.train.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        limit = self.config.train.max_steps_per_epoch
        return batches[:limit] if limit else batches

    def _step(self, batch: Sequence[Example]) -> float:
        inputs, targets = teacher_forcing(batch, self.device)
        grid = self.features[torch.as_tensor([e.image_row for e in batch])].to(self.device)
        traits = torch.as_tensor([e.trait for e in batch], device=self.device)
        logits = self.model.decoder(grid, traits, inputs)
        loss = caption_loss(logits, targets, self.config.train.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.decoder.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        return loss.item()

    def train_epoch(self, epoch: int) -> float:
        self.model.decoder.train()
        losses: list[float] = []
        batches = self._batches(epoch)
        with progress(len(batches), f"epoch {epoch + 1} of {self.config.train.epochs}", "batches") as bar:
            for batch in batches:
                losses.append(self._step(batch))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
        return float(np.mean(losses)) if losses else float("nan")

    def captions(self, queries: Sequence[Query], slots: Sequence[int], options) -> list[str]:
        rows = [self.image_rows[q.image_path] for q in queries]
        return caption_rows(self.model, self.features, rows, slots, options, seed=self.config.train.seed)

    def validate(self, options=None) -> dict[str, Any]:
        """Greedy captions of the val queries (or ``options``' decoding), scored."""
        options = options or self.config.model.decoder.decoding.model_copy(update={"method": "greedy"})
        captions = self.captions(self.val_queries, self.val_slots, options)
        metrics = score_queries(self.val_queries, captions)
        metrics["examples"] = captions[:3]
        return metrics

    def run(self) -> GeneratorResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(self.config))
        (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        best, best_epoch, bad, started = float("-inf"), -1, 0, time.perf_counter()
        for epoch in range(self.config.train.epochs):
            start = time.perf_counter()
            loss = self.train_epoch(epoch)
            val = self.validate()
            improved = val["cider_d"] > best
            if improved:
                best, best_epoch, bad = val["cider_d"], epoch + 1, 0
                save_generator(self.model, self.out_dir / "best", metrics={"val": val, "epoch": epoch + 1})
            else:
                bad += 1
            save_generator(self.model, self.out_dir / "last", metrics={"val": val, "epoch": epoch + 1})
            record = {"epoch": epoch + 1, "loss": loss, "val": val, "best": improved,
                      "seconds": round(time.perf_counter() - start, 2)}
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            logger.info("epoch %d: loss %.3f, val greedy BLEU-4 %.2f CIDEr-D %.2f (%.1fs)%s | %s", epoch + 1, loss,
                        val["bleu_4"], val["cider_d"], record["seconds"], " *best*" if improved else "",
                        val["examples"][0])
            if bad >= self.config.train.patience:
                logger.info("early stopping: no val CIDEr-D improvement for %d epochs", bad)
                break
        return self.finish(best_epoch, time.perf_counter() - started)

    def finish(self, best_epoch: int, seconds: float) -> GeneratorResult:
        best = self.out_dir / "best"
        load_weights(self.model, best / WEIGHTS)
        decoding = self.config.model.decoder.decoding
        captions = self.captions(self.val_queries, self.val_slots, decoding)
        report: dict[str, Any] = {"best_epoch": best_epoch, "train_seconds": round(seconds, 1),
                                  "decoding": decoding.model_dump(mode="json")}
        report["val"] = score_queries(self.val_queries, captions,
                                      training_captions=[r.caption for r in self.train_records],
                                      voices=voice_classifier(self.train_records))
        report["val_greedy"] = self.validate()
        report["val_examples"] = [{"image": q.image_id, "trait": q.trait, "caption": c}
                                  for q, c in list(zip(self.val_queries, captions, strict=True))[:10]]
        (self.out_dir / "report.json").write_text(json.dumps(report, indent=1))
        val = report["val"]
        logger.info("best epoch %d, val (%s): BLEU-1 %.2f BLEU-4 %.2f ROUGE-L %.2f CIDEr-D %.2f, %d distinct "
                    "words, %.1f%% novel", best_epoch, decoding.method, val["bleu_1"], val["bleu_4"],
                    val["rouge_l"], val["cider_d"], val["distinct_words"], val["novel_pct"])
        return GeneratorResult(self.out_dir, best, report)


def train_generator(config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False) -> GeneratorResult:
    """Train the caption generator ``config.model.family`` names; the best checkpoint is ``out_dir/best``."""
    if config.model.family == "retrieval":
        raise ValueError("train_generator trains the generative families; use transresnet.train.train for retrieval")
    if resume:
        raise ValueError("--resume is not supported for caption generators yet; start the run again")
    return GeneratorTrainer(config, Path(out_dir)).run()
