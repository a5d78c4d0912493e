"""The one encoding path: training's validation, the evaluator, index builds and the service call these.

``encode_captions`` runs the checkpoint's own ``model.encode_text`` over batches of similar token length
(little padding, and equal-length batches need no attention mask), under ``torch.inference_mode``.
By default ("auto") reduced precision (float16 on a GPU, bfloat16 on CPUs with native bf16 support) is
used only after a calibration sample shows it stays within ``MIN_COSINE`` of float32; otherwise float32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from transresnet.model import TransResNet
from transresnet.options import Precision, choices
from transresnet.progress import progress as progress_reporter
from transresnet.runtime import eval_mode

logger = logging.getLogger(__name__)

PRECISIONS = choices(Precision)
MIN_COSINE = 0.999
"""Reduced precision is accepted when every calibration vector has this cosine similarity to float32."""
DEFAULT_BATCH_SIZE = 128


def _lengths(model: TransResNet, texts: Sequence[str]) -> np.ndarray:
    """Token counts when the encoder has a tokenizer (one fast batched call), else character counts."""
    tokenizer = getattr(model.text, "tokenizer", None)
    if tokenizer is None:
        return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    ids = tokenizer(list(texts), truncation=True, max_length=getattr(model.text, "max_length", None),
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(texts))


def length_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of at most ``batch_size`` over length-sorted positions; a batch never straddles
    two lengths when the tail of a length group is at least half a batch (so most batches have no
    padding at all) and otherwise tops up with the next lengths."""
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        stop = min(start + batch_size, len(order))
        group_end = int(np.searchsorted(lengths[order], lengths[order[start]], side="right"))
        if start < group_end < stop and group_end - start >= batch_size // 2:
            stop = group_end
        yield order[start:stop]
        start = stop


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _candidate_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else None
    return torch.float16 if precision == "float16" else torch.bfloat16


def _run(model: TransResNet, texts: Sequence[str], dtype: torch.dtype | None) -> torch.Tensor:
    with _autocast(model.device, dtype):
        return model.encode_text(texts).float()


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def choose_precision(model: TransResNet, texts: Sequence[str], precision: str = "auto",
                     *, sample: int = 64) -> str:
    """The precision ``encode_captions`` will use: reduced only if a spread-out sample of ``texts``
    (short to long) encodes within ``MIN_COSINE`` of float32."""
    dtype = _candidate_dtype(model.device, precision)
    if dtype is None or not texts:
        return "float32"
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    picks = [texts[by_length[int(j)]] for j in np.linspace(0, len(texts) - 1, min(sample, len(texts)))]
    with eval_mode(model), torch.inference_mode():
        cosine = min_cosine(_run(model, picks, dtype), _run(model, picks, None))
    name = str(dtype).removeprefix("torch.")
    if cosine < MIN_COSINE:
        logger.warning("%s encoding drifts from float32 (min cosine %.5f < %.3f); encoding in float32",
                       name, cosine, MIN_COSINE)
        return "float32"
    logger.info("encoding captions in %s (min cosine to float32 %.5f on %d captions)", name, cosine, len(picks))
    return name


def encode_captions(model: TransResNet, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                    precision: str = "auto", progress: bool | None = None) -> np.ndarray:
    """Captions -> caption vectors, float32 (N, D), row i for ``texts[i]``.

    ``precision``: "auto" (reduced precision where the hardware has it, if a calibration sample stays
    within ``MIN_COSINE`` of float32; see :func:`choose_precision`), or "float32", "bfloat16", "float16"
    used as given. ``progress``: None = a bar on a terminal, log lines otherwise; False = silent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    out = np.empty((len(texts), model.embed_dim), dtype=np.float32)
    if not texts:
        return out
    # "auto" is checked against float32 here; an explicit precision is the caller's (already checked) choice.
    chosen = choose_precision(model, texts, precision) if precision == "auto" else precision
    if _candidate_dtype(model.device, chosen) is None:
        chosen = "float32"
    dtype = None if chosen == "float32" else getattr(torch, chosen)
    lengths = _lengths(model, texts)
    bar = progress_reporter(len(texts), f"encoding {len(texts)} captions", "captions", enabled=progress)
    with eval_mode(model), torch.inference_mode(), bar:
        for batch in length_batches(lengths, batch_size):
            vectors = _run(model, [texts[i] for i in batch], dtype)
            out[batch] = vectors.cpu().numpy()
            bar.update(len(batch))
    return out


def encode_queries(model: TransResNet, trait_ids: Sequence[int] | torch.Tensor, *,
                   images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> np.ndarray:
    """Image (pixels or cached backbone features) + trait slots -> query vectors, float32 (B, D).

    Always float32: queries are few, and this keeps them bit-comparable with the evaluator's.
    """
    trait_ids = torch.as_tensor(trait_ids, dtype=torch.long).reshape(-1)
    with eval_mode(model), torch.inference_mode():
        vectors = model.encode_query(trait_ids=trait_ids, images=images, features=features)
    return vectors.float().cpu().numpy()


def encode_photo_queries(model: TransResNet, pixels: torch.Tensor, trait_ids: Sequence[Sequence[int]]
                         ) -> list[np.ndarray]:
    """Photos (B, 3, H, W) and each photo's trait slots -> one (n_i, D) float32 query array per photo.

    Each photo goes through the backbone once, however many personalities it is asked in: the service's
    micro-batches and :class:`transresnet.index.captioner.Captioner` both encode this way.
    """
    if len(trait_ids) != len(pixels):
        raise ValueError(f"{len(pixels)} photos but trait slots for {len(trait_ids)}")
    counts = torch.tensor([len(slots) for slots in trait_ids])
    flat = torch.tensor([slot for slots in trait_ids for slot in slots], dtype=torch.long)
    with eval_mode(model), torch.inference_mode():
        features = model.encode_image(pixels)
        features = features.repeat_interleave(counts.to(features.device), dim=0)
    queries = encode_queries(model, flat, features=features)
    return [np.ascontiguousarray(chunk) for chunk in np.split(queries, np.cumsum(counts.numpy())[:-1])]
