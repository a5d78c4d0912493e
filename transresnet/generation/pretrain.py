"""Language-model pretraining of a caption decoder: truncated backpropagation through time on a caption pool.

The classic recurrent LM loop (and, with ``model.decoder.vocab.level: char``, the lecture's min-char-rnn on
caption text): the pool's captions become one token stream ``<bos> w1 .. wn <eos> <bos> ...`` (shuffled per
epoch), cut into ``batch_size`` parallel rows and trained ``bptt`` steps at a time. The recurrent state is
carried from one chunk to the next and detached between them, so gradients flow through at most ``bptt``
steps while the state still sees the whole stream.

**No image**: the decoder is driven through its own ``initial_state`` / ``step`` with a *zero image context*
(:func:`no_image_context`): the projected image vector is zeros and the attention decoders attend over one
zero cell, so the image contributes nothing; the trait is slot 0 (no personality). Everything the step uses
besides the image (word embedding, recurrent cells, output layer) is what captioning trains next, so the
fine-tuning starts from these weights.

**Leakage**: captions of any image the run validates or tests on are excluded from the pool by image file
name and stem (:func:`held_out_records`, :func:`load_pool`), and the count is logged; training always goes
through this guard. The loss and perplexity count the tokens captioning's loss counts (words and <eos>):
the <bos> after each <eos> is a certain transition, so it is not scored.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transresnet.config import ExperimentConfig, PretrainConfig
from transresnet.data import CaptionRecord, load_dataset
from transresnet.generation.data import bptt_chunks, exclude_images, parallel_streams, token_stream
from transresnet.generation.models import CaptionDecoder, Context, State
from transresnet.generation.vocab import BOS_ID, PAD_ID, Vocabulary
from transresnet.progress import progress
from transresnet.runtime import eval_mode

logger = logging.getLogger(__name__)


@dataclass
class PoolCaptions:
    captions: list[str]
    """The pool's captions that may be trained on."""
    excluded: int
    """Pool captions of held-out (val or test) images, left out."""


def held_out_records(config: ExperimentConfig, val: Sequence[CaptionRecord],
                     test: Sequence[CaptionRecord]) -> list[CaptionRecord]:
    """Records of every image the run holds out: ``val`` and ``test``, and every record of the training file
    outside the training split (its val/test images, whether or not this run evaluates them)."""
    data = config.data
    others: list[CaptionRecord] = []
    if data.train and data.train_split:
        everything = load_dataset(data.train, image_dir=data.image_dir, require_images=False).records
        others = [r for r in everything if r.split != data.train_split
                  and not (data.train_split == "train" and r.split == "restval")]
    return [*val, *test, *others]


def load_pool(cfg: PretrainConfig, held_out: Sequence[CaptionRecord]) -> PoolCaptions:
    """The pool's captions without those of held-out images (matched by image file name or stem)."""
    if not cfg.captions:
        raise ValueError("train.pretrain.captions is not set: name a caption pool file to pretrain on")
    records = load_dataset(cfg.captions, split=cfg.split, require_images=False).records
    kept, excluded = exclude_images(records, held_out)
    logger.info("pretraining pool %s: %d captions of %d images; %d captions of held-out (val/test) images "
                "excluded", cfg.captions, len(kept), len({r.image_id for r in kept}), excluded)
    if not kept:
        raise ValueError(f"{cfg.captions} has no captions left to pretrain on after excluding the {excluded} of "
                         "val/test images; give a pool with captions of other images")
    return PoolCaptions([r.caption for r in kept], excluded)


def no_image_context(decoder: CaptionDecoder, rows: int, device: torch.device) -> Context:
    """The zero image context: projected image vector zeros, one zero cell to attend, trait slot 0."""
    mean = torch.zeros(rows, decoder.cfg.feature_dim, device=device)
    trait = None if decoder.trait is None else decoder.trait(torch.zeros(rows, dtype=torch.long, device=device))
    attention = getattr(decoder, "attention", None)
    if attention is None:
        return Context(mean=mean, trait=trait)
    cells = mean.unsqueeze(1)  # attention over one cell puts all its weight on it: the attended vector is 0
    return Context(mean=mean, cells=cells, keys=attention.key(cells), trait=trait)


def _detach(state: State) -> State:
    return tuple(s.detach() for s in state)


def chunk_loss(decoder: CaptionDecoder, inputs: torch.Tensor, targets: torch.Tensor,
               state: State | None) -> tuple[torch.Tensor, int, State]:
    """Summed cross entropy of one chunk (B, T), its scored-token count and the state after it.

    ``state`` None starts from the decoder's initial state. The context is rebuilt per chunk because its
    attention keys belong to the previous chunk's (freed) graph.
    """
    ctx = no_image_context(decoder, inputs.shape[0], inputs.device)
    state = decoder.initial_state(ctx) if state is None else state
    logits = []
    for t in range(inputs.shape[1]):
        out, state = decoder.step(inputs[:, t], state, ctx)
        logits.append(out)
    scored = targets.masked_fill(targets == BOS_ID, PAD_ID)  # <bos> after <eos> is certain: not scored
    loss = F.cross_entropy(torch.stack(logits, 1).reshape(-1, decoder.vocab_size).float(), scored.reshape(-1),
                           ignore_index=PAD_ID, reduction="sum")
    return loss, int((scored != PAD_ID).sum()), state


def run_streams(decoder: CaptionDecoder, streams: torch.Tensor, bptt: int, *,
                optimizer: torch.optim.Optimizer | None = None, grad_clip: float | None = None,
                max_steps: int | None = None, desc: str = "language model") -> float:
    """One pass of truncated BPTT over parallel ``streams`` (B, N): trains with ``optimizer``, else only
    scores (no gradients, dropout off). Returns the perplexity over the scored tokens."""
    chunks = bptt_chunks(streams.to(next(decoder.parameters()).device), bptt)[:max_steps]
    total, count, state = 0.0, 0, None
    with progress(len(chunks), desc, "chunks") as bar:
        for inputs, targets in chunks:
            if optimizer is None:
                with torch.no_grad():
                    loss, n, state = chunk_loss(decoder, inputs, targets, state)
            else:
                loss, n, state = chunk_loss(decoder, inputs, targets, state)
                optimizer.zero_grad(set_to_none=True)
                (loss / max(n, 1)).backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(decoder.parameters(), grad_clip)
                optimizer.step()
            state = _detach(state)  # the state carries on; its history is cut (truncated BPTT)
            total, count = total + loss.item(), count + n
            bar.set_postfix(ppl=f"{math.exp(total / max(count, 1)):.1f}")
            bar.update(1)
    return math.exp(total / count) if count else float("nan")


def stream_perplexity(decoder: CaptionDecoder, captions: Sequence[str], vocab: Vocabulary, *, bptt: int,
                      batch_size: int) -> float:
    """Perplexity of the decoder as a no-image language model on ``captions`` (in order, dropout off)."""
    stream = token_stream(captions, vocab)
    rows = max(1, min(batch_size, stream.numel() // (bptt + 1)))  # short held-out texts get fewer rows
    with eval_mode(decoder):
        return run_streams(decoder, parallel_streams(stream, rows), bptt, desc="scoring the held-out captions")


def pretrain_decoder(decoder: CaptionDecoder, vocab: Vocabulary, captions: Sequence[str], cfg: PretrainConfig, *,
                     held_out: Sequence[str] = (), grad_clip: float | None = None, seed: int = 0,
                     on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``decoder`` as a language model on ``captions`` for ``cfg.epochs`` epochs; one record per epoch
    (train and held-out perplexity, tokens, seconds), also passed to ``on_epoch`` as it is made."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    order = list(captions)
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        random.Random(seed * 1_000_003 + epoch).shuffle(order)  # seeded per epoch: a rerun draws the same stream
        streams = parallel_streams(token_stream(order, vocab), cfg.batch_size)
        decoder.train()
        train_ppl = run_streams(decoder, streams, cfg.bptt, optimizer=optimizer, grad_clip=grad_clip,
                                max_steps=cfg.max_steps_per_epoch,
                                desc=f"pretraining epoch {epoch + 1} of {cfg.epochs}")
        record: dict[str, Any] = {"pretrain_epoch": epoch + 1, "train_ppl": round(train_ppl, 3)}
        if held_out:
            record["val_ppl"] = round(stream_perplexity(decoder, held_out, vocab, bptt=cfg.bptt,
                                                        batch_size=cfg.batch_size), 3)
        record.update(tokens=int(streams.numel()), seconds=round(time.perf_counter() - start, 2))
        logger.info("pretraining epoch %d: train perplexity %.2f, held-out perplexity %s (%d tokens, %.1fs)",
                    epoch + 1, train_ppl, record.get("val_ppl", "n/a"), record["tokens"], record["seconds"])
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history
