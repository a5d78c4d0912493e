"""Training a caption generator: teacher forcing with cross entropy over cached grid features.

The backbone is frozen and its grid features come from the on-disk feature cache once (with
``data.augment_crops``, also that many random crops of each training photo, one drawn per example and step,
as the retrieval trainer does); each epoch
shuffles the (image, trait, caption) examples, minimises the word cross entropy (optional label smoothing)
with clipped gradients, then captions the validation queries greedily and scores them. The best epoch by
val CIDEr-D is ``OUT/best``, the latest ``OUT/last``; training stops after ``train.patience`` epochs
without improvement. The report scores ``best`` with the config's decoding (beam search by default).

Optional, both off by default: language-model pretraining of the decoder on a caption pool before the first
epoch (``train.pretrain``, :mod:`transresnet.generation.pretrain`), and scheduled sampling
(``train.scheduled_sampling``, Bengio et al. 2015), which feeds the model's own previous prediction instead
of the gold token with a probability that ramps up over the epochs.

Also optional: self-critical fine-tuning (``train.self_critical``, :mod:`transresnet.generation.self_critical`)
after the cross-entropy epochs end (their budget or patience): it starts from the best checkpoint with a fresh
optimizer, rewards candidate captions (sampled, or the best beams) with their CIDEr-D, and validates and
selects like the epochs before it, so ``best`` is the better of the two phases on val.

After pretraining and after every epoch a complete training state (weights, optimizer, progress and RNG
states) is published atomically in ``OUT/states/`` and named by ``OUT/LAST``, with the retrieval trainer's
helpers (:mod:`transresnet.train`); ``resume=True`` continues from the newest state that verifies and ends
with the weights an uninterrupted run would have on CPU.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transresnet.checkpoint import WEIGHTS, CheckpointError, load_weights
from transresnet.config import ExperimentConfig, ScheduledSamplingConfig, dump_config
from transresnet.devices import resolve_device
from transresnet.generation.checkpoint import VOCAB, CaptionModel, save_generator, write_generator
from transresnet.generation.data import Example, Query, build_examples, grid_features, group_queries, teacher_forcing
from transresnet.generation.decoding import greedy as greedy_decode
from transresnet.generation.evaluate import caption_rows, score_queries, voice_classifier
from transresnet.generation.metrics import CiderD
from transresnet.generation.models import CaptionDecoder
from transresnet.generation.pretrain import held_out_records, load_pool, pretrain_decoder
from transresnet.generation.self_critical import (
    beam_candidates,
    leave_one_out_baseline,
    policy_gradient_loss,
    repeat_rows,
    sample_with_logprobs,
    teacher_forced_logprobs,
)
from transresnet.generation.vocab import BOS_ID, PAD_ID, Vocabulary
from transresnet.progress import progress
from transresnet.train import (
    STATE_JSON,
    build_traits,
    find_resume_state,
    keep_metrics_through,
    load_splits,
    load_train_state,
    publish_state,
    save_train_state,
    seed_everything,
    start_fresh,
)

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


def sampling_probability(cfg: ScheduledSamplingConfig, epoch: int) -> float:
    """Scheduled sampling's probability at ``epoch`` (from 0): a linear ramp from ``start_epoch`` to max_prob."""
    if cfg.max_prob <= 0 or epoch < cfg.start_epoch:
        return 0.0
    if cfg.ramp_epochs == 0:
        return cfg.max_prob
    return cfg.max_prob * min(1.0, (epoch - cfg.start_epoch + 1) / cfg.ramp_epochs)


def scheduled_sampling_logits(decoder: CaptionDecoder, grid: torch.Tensor, traits: torch.Tensor,
                              inputs: torch.Tensor, prob: float, feed: str = "sample") -> torch.Tensor:
    """Teacher forcing where each input after ``<bos>`` is, with probability ``prob``, the model's own
    prediction at the previous step (drawn from its distribution, or its argmax) instead of the gold token.

    Padding positions keep their <pad>, and the fed prediction is never <pad> or <bos> (decoding never
    emits them either). No gradient flows through the choice, as in Bengio et al. 2015.
    """
    ctx = decoder.prepare(grid, traits)
    state = decoder.initial_state(ctx)
    token, logits = inputs[:, 0], []
    for t in range(inputs.shape[1]):
        out, state = decoder.step(token, state, ctx)
        logits.append(out)
        if t + 1 == inputs.shape[1]:
            break
        gold = inputs[:, t + 1]
        with torch.no_grad():
            never = torch.tensor([PAD_ID, BOS_ID], device=out.device)
            scores = out.detach().float().index_fill(1, never, float("-inf"))  # a copy: the logits stay intact
            predicted = (scores.argmax(-1) if feed == "argmax"
                         else torch.multinomial(scores.softmax(-1), 1).squeeze(1))
            use = (torch.rand(gold.shape, device=gold.device) < prob) & (gold != PAD_ID)
        token = torch.where(use, predicted, gold)
    return torch.stack(logits, dim=1)


@dataclass
class GeneratorProgress:
    """What a training state records besides weights and optimizer: where the run is and how it stands."""

    epoch: int = 0
    """Captioning epochs completed."""
    best_score: float = -1.0
    """Best val CIDEr-D so far (greedy)."""
    best_epoch: int = -1
    bad_epochs: int = 0
    """Epochs since the last improvement (the patience counter)."""
    pretrained: bool = False
    """Language-model pretraining has run (a resumed run never repeats it)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """Its summary for the report: pool captions kept and excluded, perplexity per epoch."""
    phase: str = "cross_entropy"
    """``cross_entropy``, then ``self_critical`` once that fine-tuning has started."""
    self_critical_epochs: int = 0
    """Self-critical epochs completed (they count in ``epoch`` too)."""


END_OF_CAPTION = "<eos>"
"""Scored as a last word by the self-critical reward (normalisation never produces it from text)."""
LATER_PROGRESS_FIELDS = ("phase", "self_critical_epochs")
"""Progress fields that states written before self-critical training lack (their defaults apply)."""


class GeneratorTrainer:
    def __init__(self, config: ExperimentConfig, out_dir: Path) -> None:
        self.config = config
        self.out_dir = out_dir
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)
        self.train_records, val_records, test_records = load_splits(config)
        vocab_cfg = config.model.decoder.vocab
        vocab = Vocabulary.build([r.caption for r in self.train_records], level=vocab_cfg.level,
                                 min_count=vocab_cfg.min_count, max_size=vocab_cfg.max_size)
        traits = build_traits(config, self.train_records)
        self.model = CaptionModel(config, vocab, traits).to(self.device)
        paths = list(dict.fromkeys(r.image_path for r in (*self.train_records, *val_records)))
        self.image_rows = {p: i for i, p in enumerate(paths)}
        self.features = grid_features(self.model, paths, root=config.data.feature_cache,
                                      num_workers=config.train.num_workers)
        self.crops = self._training_crops(paths)
        slots = self.model.trait_slots([r.personality for r in self.train_records])
        self.examples = build_examples(self.train_records, self.image_rows, slots, vocab, vocab_cfg.max_tokens)
        self.val_records, self.test_records = val_records, test_records
        self.val_queries = group_queries(val_records)
        self.val_slots = self.model.trait_slots([q.trait for q in self.val_queries])
        self.optimizer = self._adam(config.train.lr)
        self._rewards: tuple[list[Query], CiderD] | None = None
        self.progress = GeneratorProgress()
        logger.info("%s decoder (%s): %d examples over %d images, vocabulary %d %ss, %d traits; val %d queries, "
                    "grid %s, on %s", config.model.family, config.model.decoder.cell, len(self.examples),
                    len({e.image_row for e in self.examples}), len(vocab), vocab.level, len(traits) - 1,
                    len(self.val_queries), tuple(self.features.shape[1:]), self.device)

    def _training_crops(self, paths: Sequence[Path]) -> torch.Tensor | None:
        """With ``data.augment_crops``, every training image's grid for its centre crop and that many random
        crops (T, views, cells, F); training images are the first rows of ``paths``."""
        crops = self.config.data.augment_crops
        if not crops:
            return None
        train_paths = list(dict.fromkeys(r.image_path for r in self.train_records))
        assert paths[: len(train_paths)] == train_paths
        return grid_features(self.model, train_paths, root=self.config.data.feature_cache,
                             num_workers=self.config.train.num_workers, views=1 + crops)

    def training_grid(self, rows: Sequence[int]) -> torch.Tensor:
        """Grid features of training rows: the centre crop, or with cached crops one view drawn per row."""
        index = torch.as_tensor(list(rows))
        if self.crops is None:
            return self.features[index].to(self.device)
        view = torch.randint(self.crops.shape[1], (len(index),))
        return self.crops[index, view].to(self.device)

    def _adam(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.decoder.parameters(), lr=lr, weight_decay=self.config.train.weight_decay)

    def _batches(self, epoch: int) -> list[list[Example]]:
        rng = random.Random(self.config.train.seed * 100_003 + epoch)
        order = list(self.examples)
        rng.shuffle(order)
        size = self.config.train.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        limit = self.config.train.max_steps_per_epoch
        return batches[:limit] if limit else batches

    def _step(self, batch: Sequence[Example], sampling: float = 0.0) -> float:
        inputs, targets = teacher_forcing(batch, self.device)
        grid = self.training_grid([e.image_row for e in batch])
        traits = torch.as_tensor([e.trait for e in batch], device=self.device)
        if sampling > 0:
            logits = scheduled_sampling_logits(self.model.decoder, grid, traits, inputs, sampling,
                                               self.config.train.scheduled_sampling.feed)
        else:  # plain teacher forcing, exactly as without scheduled sampling
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
        sampling = sampling_probability(self.config.train.scheduled_sampling, epoch)
        with progress(len(batches), f"epoch {epoch + 1} of {self.config.train.epochs}", "batches") as bar:
            for batch in batches:
                losses.append(self._step(batch, sampling))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"sampling": f"{sampling:.2f}"} if sampling else {}))
                bar.update(1)
        return float(np.mean(losses)) if losses else float("nan")

    # -- self-critical fine-tuning ------------------------------------------------------------------

    def reward_queries(self) -> tuple[list[Query], CiderD]:
        """The training (image, trait) queries and the CIDEr-D scorer of their references (built once)."""
        if self._rewards is None:
            queries = group_queries(self.train_records)
            self._rewards = queries, CiderD([q.references for q in queries], end_token=END_OF_CAPTION)
        return self._rewards

    def _self_critical_step(self, queries: Sequence[Query], items: Sequence[int], cider: CiderD,
                            generator: torch.Generator) -> dict[str, float]:
        """``samples`` candidates per query (sampled, or its best beams), rewarded with their CIDEr-D against
        the query's references, and one policy-gradient step."""
        cfg = self.config.train.self_critical
        batch = [queries[i] for i in items]
        rows = [self.image_rows[q.image_path] for q in batch]
        slots = self.model.trait_slots([q.trait for q in batch])
        grid = self.training_grid(rows).repeat_interleave(cfg.samples, dim=0)  # one view for a query's samples
        traits = torch.as_tensor(repeat_rows(slots, cfg.samples), device=self.device)
        decoding = self.config.model.decoder.decoding
        self.model.decoder.train()
        if cfg.candidates == "beam":
            beams = beam_candidates(self.model.decoder, grid[::cfg.samples], traits[::cfg.samples], decoding,
                                    cfg.samples)
            # A row with fewer finished beams than asked repeats its best.
            words = [row[i] if i < len(row) else (row[0] if row else []) for row in beams for i in range(cfg.samples)]
            samples = teacher_forced_logprobs(self.model.decoder, grid, traits, words)
        else:
            samples = sample_with_logprobs(self.model.decoder, grid, traits, decoding, generator)
        captions = [self.model.vocab.decode(ids) for ids in samples.tokens]
        rewards = torch.tensor(cider.scores(captions, repeat_rows(items, cfg.samples))).view(len(batch), -1)
        if cfg.baseline == "mean":
            baseline = leave_one_out_baseline(rewards)
        else:  # the greedy caption's reward, decoded in eval mode (no dropout), as in Rennie et al.
            greedy = [self.model.vocab.decode(ids) for ids in
                      greedy_decode(self.model.decoder, grid[::cfg.samples], traits[::cfg.samples], decoding)]
            baseline = torch.tensor(cider.scores(greedy, items)).unsqueeze(1).expand_as(rewards)
        loss = policy_gradient_loss(samples, (rewards - baseline).reshape(-1).to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.decoder.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        return {"loss": loss.item(), "reward": rewards.mean().item(), "baseline": baseline.mean().item()}

    def self_critical_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training queries in shuffled batches; mean loss, sample reward and baseline
        (CIDEr-D x 100, the reported scale)."""
        cfg = self.config.train.self_critical
        queries, cider = self.reward_queries()
        order = list(range(len(queries)))
        random.Random(self.config.train.seed * 100_003 + epoch).shuffle(order)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        limit = self.config.train.max_steps_per_epoch
        batches = batches[:limit] if limit else batches
        generator = torch.Generator().manual_seed(self.config.train.seed * 100_003 + epoch)
        steps: list[dict[str, float]] = []
        with progress(len(batches), f"self-critical epoch {self.progress.self_critical_epochs + 1} of {cfg.epochs}",
                      "batches") as bar:
            for items in batches:
                steps.append(self._self_critical_step(queries, items, cider, generator))
                bar.set_postfix(reward=f"{100 * steps[-1]['reward']:.1f}")
                bar.update(1)
        return {key: float(np.mean([s[key] for s in steps])) * (1 if key == "loss" else 100) for key in steps[0]}

    def start_self_critical(self) -> None:
        """Enter the self-critical phase from the best cross-entropy weights with a fresh optimizer."""
        best = self.out_dir / "best"
        if best.is_dir():
            load_weights(self.model, best / WEIGHTS)
        self.optimizer = self._adam(self.config.train.self_critical.lr)
        self.progress.phase, self.progress.bad_epochs = "self_critical", 0
        cfg = self.config.train.self_critical
        logger.info("self-critical training from %s (val CIDEr-D %.2f at epoch %d), lr %g, %d %s candidates, %s "
                    "baseline", best if best.is_dir() else "the current weights", self.progress.best_score,
                    self.progress.best_epoch, cfg.lr, cfg.samples, cfg.candidates, cfg.baseline)

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

    # -- pretraining --------------------------------------------------------------------------------

    def pretrain(self) -> None:
        """Language-model pretraining of the decoder on ``train.pretrain.captions`` (val/test images excluded);
        each epoch's perplexities go to metrics.jsonl and the log, the summary into the progress."""
        cfg = self.config.train.pretrain
        pool = load_pool(cfg, held_out_records(self.config, self.val_records, self.test_records))

        def log_epoch(record: dict[str, Any]) -> None:
            self._append_metrics({"phase": "pretrain", **record, "excluded_held_out": pool.excluded})

        history = pretrain_decoder(self.model.decoder, self.model.vocab, pool.captions, cfg,
                                   held_out=[r.caption for r in self.val_records],
                                   grad_clip=self.config.train.grad_clip, seed=self.config.train.seed,
                                   on_epoch=log_epoch)
        self.progress.pretrained = True
        self.progress.pretrain = {"captions": len(pool.captions), "excluded_held_out": pool.excluded,
                                  "epochs": history}

    # -- persistence ----------------------------------------------------------------------------------

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _save_state(self, metrics: dict[str, Any]) -> Path:
        """Weights, optimizer, progress and RNG states as one unit, published atomically (transresnet.train)."""
        def write(folder: Path) -> None:
            write_generator(self.model, folder, metrics=metrics,
                            extra=lambda f: save_train_state(f, self.optimizer, asdict(self.progress)))

        return publish_state(self.out_dir, write, self.progress.epoch)

    def resume(self) -> None:
        """Continue from the newest complete state: its weights, optimizer, progress and RNG states."""
        folder = find_resume_state(self.out_dir)
        if (folder / VOCAB).read_text() != self.model.vocab.to_json():
            raise CheckpointError(f"{folder} was trained with another caption vocabulary than this config's data "
                                  "gives; resume with the config and data the run started with")
        load_weights(self.model, folder / WEIGHTS, against="the model this config builds (resume with the config "
                                                             "the run started with)")
        state = load_train_state(folder, self.optimizer)
        names = [f.name for f in fields(GeneratorProgress)]
        missing = [k for k in names if k not in state and k not in LATER_PROGRESS_FIELDS]
        if missing:
            raise CheckpointError(f"training state {folder / STATE_JSON} lacks {', '.join(missing)}; "
                                  "start again without --resume")
        self.progress = GeneratorProgress(**{k: state[k] for k in names if k in state})
        keep_metrics_through(self.out_dir, self.progress.epoch)
        logger.info("resumed from %s after epoch %d (best val CIDEr-D %.2f at epoch %d)", folder,
                    self.progress.epoch, self.progress.best_score, self.progress.best_epoch)

    # -- driver ---------------------------------------------------------------------------------------

    def _after_validation(self, val: dict[str, Any]) -> bool:
        """Track the best epoch (saving ``best``); True when patience has run out."""
        progress = self.progress
        if val["cider_d"] > progress.best_score:
            progress.best_score, progress.best_epoch, progress.bad_epochs = val["cider_d"], progress.epoch, 0
            save_generator(self.model, self.out_dir / "best", metrics={"val": val, "epoch": progress.epoch})
        else:
            progress.bad_epochs += 1
        return progress.bad_epochs >= self.config.train.patience

    def _train_one_epoch(self) -> dict[str, Any]:
        """The current phase's epoch: what the record keeps of it (loss, and sampling or rewards)."""
        epoch = self.progress.epoch
        if self.progress.phase == "self_critical":
            summary = self.self_critical_epoch(epoch)
            self.progress.self_critical_epochs += 1
            return {"phase": "self_critical", **summary}
        return {"loss": self.train_epoch(epoch),
                "sampling": sampling_probability(self.config.train.scheduled_sampling, epoch)}

    def _epoch(self) -> bool:
        """One epoch of the current phase, validated, recorded and saved as a state; True when it should stop."""
        start = time.perf_counter()
        trained = self._train_one_epoch()
        self.progress.epoch += 1
        val = self.validate()
        stop = self._after_validation(val)
        epoch = self.progress.epoch
        save_generator(self.model, self.out_dir / "last", metrics={"val": val, "epoch": epoch})
        record = {"epoch": epoch, **trained, "val": val, "best": self.progress.best_epoch == epoch,
                  "seconds": round(time.perf_counter() - start, 2)}
        self._append_metrics(record)
        self._save_state(record)
        rewards = (f", sample reward {trained['reward']:.2f} vs baseline {trained['baseline']:.2f}"
                   if "reward" in trained else "")
        logger.info("epoch %d: loss %.3f%s, val greedy BLEU-4 %.2f CIDEr-D %.2f (%.1fs)%s | %s", epoch,
                    trained["loss"], rewards, val["bleu_4"], val["cider_d"], record["seconds"],
                    " *best*" if record["best"] else "", val["examples"][0])
        if stop:
            logger.info("early stopping: no val CIDEr-D improvement for %d epochs", self.progress.bad_epochs)
        return stop

    def run(self) -> GeneratorResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(self.config))
        started = time.perf_counter()
        fresh = self.progress.epoch == 0 and not self.progress.pretrained
        if fresh and self.config.train.pretrain.captions:
            self.pretrain()
            self._save_state({"pretrain": self.progress.pretrain})  # a resumed run starts from the pretrained weights
        patience = self.config.train.patience
        while (self.progress.phase == "cross_entropy" and self.progress.epoch < self.config.train.epochs
               and self.progress.bad_epochs < patience):
            if self._epoch():
                break
        self_critical = self.config.train.self_critical
        if self_critical.epochs:
            if self.progress.phase != "self_critical":
                self.start_self_critical()
            while self.progress.self_critical_epochs < self_critical.epochs and self.progress.bad_epochs < patience:
                if self._epoch():
                    break
        return self.finish(self.progress.best_epoch, time.perf_counter() - started)

    def finish(self, best_epoch: int, seconds: float) -> GeneratorResult:
        best = self.out_dir / "best"
        load_weights(self.model, best / WEIGHTS)
        decoding = self.config.model.decoder.decoding
        captions = self.captions(self.val_queries, self.val_slots, decoding)
        report: dict[str, Any] = {"best_epoch": best_epoch, "train_seconds": round(seconds, 1),
                                  "decoding": decoding.model_dump(mode="json")}
        if self.progress.pretrain:
            report["pretrain"] = self.progress.pretrain
        if self.progress.self_critical_epochs:
            report["self_critical_epochs"] = self.progress.self_critical_epochs
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
    """Train the caption generator ``config.model.family`` names; the best checkpoint is ``out_dir/best``.

    ``resume``: continue from the newest complete state in ``out_dir/states`` (FileNotFoundError when the
    run has none); otherwise an earlier run's states and metrics there are replaced.
    """
    if config.model.family == "retrieval":
        raise ValueError("train_generator trains the generative families; use transresnet.train.train for retrieval")
    out_dir = Path(out_dir)
    trainer = GeneratorTrainer(config, out_dir)
    if resume:
        trainer.resume()
    else:
        start_fresh(out_dir)
    return trainer.run()
