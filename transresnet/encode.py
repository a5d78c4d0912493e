"""The one encoding path: training's validation, the evaluator, index builds and the service call these.

``encode_captions`` runs the checkpoint's own ``model.encode_text`` over batches of similar token length
(little padding, and equal-length batches need no attention mask), under ``torch.inference_mode``.
Precisions: float32; bfloat16 / float16 (torch autocast); openvino_bf16 (the text transformer exported to ONNX
and run by OpenVINO in bfloat16) and int8 (the export dynamically quantised for ONNX Runtime), both from
:mod:`transresnet.onnx_text` under the same tokenisation, pooling, projection and normalisation. "auto" tries
the reduced ones this machine has, fastest first (float16 on a GPU; on a CPU with native bfloat16
openvino_bf16 with the ``openvino`` extra, then bfloat16; then int8 with the ``onnx`` extra), and takes the first whose
calibration sample stays within its cosine bound of float32 (``MIN_COSINE``, ``MIN_COSINE_INT8``);
otherwise float32.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transresnet.model import TransResNet
from transresnet.options import Precision, choices
from transresnet.progress import progress as progress_reporter
from transresnet.runtime import eval_mode

logger = logging.getLogger(__name__)

PRECISIONS = choices(Precision)
MIN_COSINE = 0.999
"""bfloat16 / float16 are accepted when every calibration vector has this cosine similarity to float32."""
MIN_COSINE_INT8 = 0.99
"""int8 is accepted when every calibration vector has this cosine similarity to float32 (looser than the
half precisions: int8 weights move vectors more, yet recall stays within 0.5 points; docs/results.md)."""
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


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _candidates(model: TransResNet, precision: str) -> list[str]:
    """The reduced precisions to check for ``precision``, fastest first ("float32": none)."""
    _check_name(precision)
    if precision != "auto":
        return [] if precision == "float32" else [precision]
    from transresnet.onnx_text import check_openvino, unavailable_reason

    device = model.device.type
    if device == "cuda":
        return ["float16"]  # the exports run on the CPU: on a GPU, float16 is the faster choice
    if device != "cpu":
        return []
    # Fastest first as measured here (docs/results.md): OpenVINO's bfloat16, torch's bfloat16, then int8,
    # which earns its place on CPUs without native bfloat16.
    found = []
    if _cpu_has_bf16():
        try:
            check_openvino(model)
            found.append("openvino_bf16")
        except (ValueError, ImportError) as err:
            logger.debug("auto precision skips openvino_bf16: %s", err)
        found.append("bfloat16")
    reason = unavailable_reason(model)
    if reason is None:
        found.append("int8")
    else:
        logger.debug("auto precision skips int8: %s", reason)
    return found


@dataclass(frozen=True)
class _Plan:
    """How one precision runs: autocast to ``dtype``, or ``transformer`` in place of the torch one (int8,
    OpenVINO), which may take ``concurrency`` batches at once from as many threads."""

    name: str
    dtype: torch.dtype | None = None
    transformer: Callable[..., torch.Tensor] | None = None
    concurrency: int = 1


def _plan(model: TransResNet, precision: str, cache_dir: str | Path | None) -> _Plan:
    _check_name(precision)
    if precision == "int8":
        from transresnet.onnx_text import load_int8_transformer

        return _Plan("int8", transformer=load_int8_transformer(model, cache_dir=cache_dir))
    if precision == "openvino_bf16":
        from transresnet.onnx_text import check_openvino, load_openvino_transformer

        check_openvino(model)
        transformer = load_openvino_transformer(model, cache_dir=cache_dir)
        return _Plan(precision, transformer=transformer, concurrency=transformer.concurrency)
    if precision in ("float32", "auto"):
        return _Plan("float32")
    return _Plan(precision, dtype=getattr(torch, precision))


def _run(model: TransResNet, texts: Sequence[str], plan: _Plan) -> torch.Tensor:
    if plan.transformer is not None:
        # The checkpoint's tokenisation, pooling, head and normalisation; only the transformer is swapped.
        return model.encode_pooled_text(model.text.pool(texts, transformer=plan.transformer))
    with _autocast(model.device, plan.dtype):
        return model.encode_text(texts).float()


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def tolerance(precision: str) -> float:
    """The least cosine to float32 a calibration vector may have for ``precision`` to be used."""
    return MIN_COSINE_INT8 if precision == "int8" else MIN_COSINE


def calibration_sample(texts: Sequence[str], sample: int = 64) -> list[str]:
    """A spread-out sample of ``texts``, short to long."""
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [texts[by_length[int(j)]] for j in np.linspace(0, len(texts) - 1, min(sample, len(texts)))]


def choose_precision(model: TransResNet, texts: Sequence[str], precision: str = "auto",
                     *, sample: int = 64, cache_dir: str | Path | None = None) -> str:
    """The precision ``encode_captions`` will use: the first reduced candidate (see :func:`_candidates`)
    whose encoding of a spread-out sample of ``texts`` stays within its :func:`tolerance` of float32,
    else float32. An explicit "int8" without the onnx extra raises ImportError saying what to install."""
    candidates = _candidates(model, precision)
    if not candidates or not texts:
        return "float32"
    picks = calibration_sample(texts, sample)
    with eval_mode(model), torch.inference_mode():
        reference = _run(model, picks, _Plan("float32"))
        for name in candidates:
            cosine = min_cosine(_run(model, picks, _plan(model, name, cache_dir)), reference)
            if cosine >= tolerance(name):
                logger.info("encoding captions in %s (min cosine to float32 %.5f on %d captions)", name, cosine,
                            len(picks))
                return name
            logger.warning("%s encoding drifts from float32 (min cosine %.5f < %.3f)", name, cosine,
                           tolerance(name))
    logger.warning("encoding captions in float32")
    return "float32"


def encode_captions(model: TransResNet, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                    precision: str = "auto", progress: bool | None = None,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """Captions -> caption vectors, float32 (N, D), row i for ``texts[i]``.

    ``precision``: "auto" (the fastest reduced precision this machine has whose calibration sample stays
    within its bound of float32; see :func:`choose_precision`), or "float32", "bfloat16", "float16",
    "openvino_bf16", "int8" used as given.
    ``progress``: None = a bar on a terminal, log lines otherwise; False = silent.
    ``cache_dir``: where int8 and OpenVINO exports are cached (default: see :mod:`transresnet.onnx_text`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    out = np.empty((len(texts), model.embed_dim), dtype=np.float32)
    if not texts:
        _check_name(precision)
        return out
    # "auto" is checked against float32 here; an explicit precision is the caller's (already checked) choice.
    chosen = choose_precision(model, texts, precision, cache_dir=cache_dir) if precision == "auto" else precision
    plan = _plan(model, chosen, cache_dir)
    lengths = _lengths(model, texts)
    bar = progress_reporter(len(texts), f"encoding {len(texts)} captions", "captions", enabled=progress)
    batches = length_batches(lengths, batch_size)
    with eval_mode(model), torch.inference_mode(), bar:
        if plan.concurrency > 1:
            _run_concurrently(model, texts, batches, plan, out, bar.update)
        else:
            for batch in batches:
                out[batch] = _run(model, [texts[i] for i in batch], plan).cpu().numpy()
                bar.update(len(batch))
    return out


def _run_concurrently(model: TransResNet, texts: Sequence[str], batches: Iterator[np.ndarray], plan: _Plan,
                      out: np.ndarray, done: Callable[[int], object]) -> None:
    """:func:`_run` with ``plan.concurrency`` transformer calls in flight. Tokenising and the head stay on
    this thread: a fast tokenizer raises "Already borrowed" when two threads call it at once."""

    def pool(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():  # per thread
            return model.text.pool_tokens(tokens, transformer=plan.transformer)

    def finish(batch: np.ndarray, pooled: Future[torch.Tensor]) -> None:
        out[batch] = model.encode_pooled_text(pooled.result()).cpu().numpy()
        done(len(batch))

    pending: deque[tuple[np.ndarray, Future[torch.Tensor]]] = deque()
    with ThreadPoolExecutor(plan.concurrency, thread_name_prefix="encode") as workers:
        for batch in batches:
            pending.append((batch, workers.submit(pool, model.text.tokenize([texts[i] for i in batch]))))
            if len(pending) > plan.concurrency:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())


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
