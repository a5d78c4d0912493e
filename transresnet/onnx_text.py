"""The int8 caption encoder: a checkpoint's text transformer exported to ONNX and dynamically quantised.

Only the transformer (token ids -> hidden states) runs in ONNX Runtime. Tokenisation, mean pooling, the
projection head and normalisation stay the checkpoint's own torch code (``TransformerTextEncoder.pool``
with ``transformer=`` and ``TransResNet.encode_pooled_text``), so the int8 path computes the same function
as float32 through :mod:`transresnet.encode`; it is never called directly.

Exports are cached, one folder per text fingerprint and exporter/runtime versions, where and how
:mod:`transresnet.onnx_cache` says (shared with the image encoder's ONNX Runtime exports): the ``cache_dir``
argument, ``$TRANSRESNET_ENCODER_CACHE``, ``<checkpoint>/encoders/`` when the checkpoint folder is writable,
else ``~/.cache/transresnet/encoders``; published atomically, verified by sha256 at load, re-exported when not.

The same module exports the plain float32 transformer that ``openvino_bf16`` compiles with OpenVINO
(:mod:`transresnet.openvino_runtime`), cached and verified the same way.

Needs the ``onnx`` extra: ``pip install "transresnet[onnx]"`` (and the ``openvino`` one for ``openvino_bf16``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import transresnet.onnx_cache as onnx_cache
import transresnet.openvino_runtime as openvino_runtime
from transresnet.checkpoint import META, text_fingerprint
from transresnet.files import sha256_file  # noqa: F401 - re-exported: tests check exports against it
from transresnet.model import TransResNet
from transresnet.onnx_cache import CACHE_ENV, INSTALL_HINT, OnnxUnavailable  # noqa: F401 - part of this API

logger = logging.getLogger(__name__)

EXPORT_VERSION = 2
"""Bump when the export or quantisation recipe changes: every cached export is then rebuilt."""
OPSET = 17
MODEL_FILE = "text_transformer.int8.onnx"
FLOAT_FILE = "text_transformer.onnx"
"""The plain float32 export OpenVINO compiles for ``openvino_bf16`` (it fuses the graph itself)."""
INT8_WEIGHTS = "QInt8 per channel, attention only"
_SESSIONS = onnx_cache.SessionMemo()

Int8Unavailable = OnnxUnavailable
"""int8 encoding was asked for but the onnx extra is not installed (the shared ONNX error)."""


def runtime_versions() -> dict[str, str]:
    """The versions an export depends on (part of the cache key); Int8Unavailable without the extra."""
    return onnx_cache.runtime_versions("int8 caption encoding", "choose --precision float32 / bfloat16")


def check_supported(model: TransResNet) -> None:
    """Raise (ValueError, Int8Unavailable) unless ``model``'s captions can be encoded in int8 here."""
    if not hasattr(model.text, "transformer"):
        raise ValueError("int8 caption encoding quantises a Transformer text encoder; this checkpoint's is a "
                         "bag of words (choose --precision float32)")
    runtime_versions()


def unavailable_reason(model: TransResNet) -> str | None:
    """Why int8 cannot run for ``model`` here, or None when it can ("auto" skips it quietly then)."""
    try:
        check_supported(model)
    except (ValueError, Int8Unavailable) as err:
        return str(err)
    return None


def cache_root(model: TransResNet, cache_dir: str | Path | None = None) -> Path:
    """Where exports of ``model`` live (see the module doc for the order)."""
    # A checkpoint's text encoder is loaded from <checkpoint>/text: cache beside the weights when allowed.
    return onnx_cache.cache_root(checkpoint_folder(model), cache_dir)


def checkpoint_folder(model: TransResNet) -> Path | None:
    """The checkpoint folder ``model`` was loaded from, when its text assets say so (else None)."""
    source = getattr(model.text, "source", None)
    return Path(source).parent if source else None


def export_key(model: TransResNet, weights: str = INT8_WEIGHTS) -> dict[str, Any]:
    """Everything the exported file depends on: a change to any of it means a new export."""
    return {"fingerprint": text_fingerprint(model), "export_version": EXPORT_VERSION, "opset": OPSET,
            "weights": weights, **runtime_versions()}


def export_folder(model: TransResNet, cache_dir: str | Path | None = None, *,
                  quantised: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cache folder and key of the int8 export (``quantised``) or of the plain float32 one."""
    key = export_key(model, INT8_WEIGHTS if quantised else "float32")
    prefix = "text-int8" if quantised else "text-float"
    return onnx_cache.keyed_folder(cache_root(model, cache_dir), prefix, key), key


# ------------------------------------------------------------------------------------------- export


class _HiddenStates(nn.Module):
    """The transformer as ONNX sees it: token tensors in a fixed order -> last hidden states."""

    def __init__(self, transformer: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.transformer = transformer
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.transformer(**dict(zip(self.names, inputs, strict=True))).last_hidden_state


def _export_float(model: TransResNet, path: Path) -> list[str]:
    """The float32 transformer as ONNX (dynamic batch and length); returns its input names."""
    transformer = copy.deepcopy(model.text.transformer).float().cpu().eval()
    # Eager attention exports as the MatMul/Softmax pattern ONNX Runtime fuses into one Attention op
    # (SDPA's export is not fused: measured 1.4x slower).
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")
    sample = model.text.tokenizer(["a dog", "two children play in the snow"], padding=True, return_tensors="pt")
    names = list(sample.keys())
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "hidden"]}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer's warnings (Python control flow on shapes) are about graphs we do not export.
        warnings.simplefilter("ignore")
        torch.onnx.export(_HiddenStates(transformer, names), tuple(sample[n] for n in names), str(path),
                          input_names=names, output_names=["hidden"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)
    return names


def _fuse(model: TransResNet, source: Path, target: Path) -> bool:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU); False for an unknown architecture."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    config = model.text.transformer.config
    if config.model_type not in MODEL_TYPES:
        logger.info("no ONNX Runtime fusions for %s text encoders; quantising the plain export",
                    config.model_type)
        return False
    # opt_level 1: ONNX Runtime's portable graph rewrites (constant folding) first, which the fusions need.
    fused = optimize_model(str(source), model_type=config.model_type, num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=1)
    logger.info("ONNX Runtime fusions: %s", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
    fused.save_model_to_file(str(target))
    return True


def _weight_nodes(path: Path, feed_forward: int) -> list[str]:
    """The nodes to quantise: those that multiply by a stored weight (fused Attention; MatMul / Gemm with
    an initializer input), except the feed-forward layers (weights with a ``feed_forward``-wide side).

    Measured on the Flickr8k voices checkpoint (val pool, 5,000 captions, 1,000 photo queries; float32
    image->caption R@1/5/10 37.2/67.7/79.4): quantising everything, 36.4/67.4/77.8 (min cosine to float32
    0.974); all but the down-projections, 36.7/67.2/78.5 (0.990); attention only, 37.5/67.8/79.4 (0.996).
    The feed-forward inputs (layer-norm outputs with a few outlier channels, GELU outputs) lose most under
    one dynamic scale per tensor. An activation-by-activation MatMul (an unfused attention's QK^T and its
    softmax times V) is never quantised, and the embedding tables stay float32.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {init.name: tuple(init.dims) for init in graph.initializer}
    chosen = []
    for node in graph.node:
        weights = [dims[name] for name in node.input if name in dims and len(dims[name]) == 2]
        if node.op_type == "Attention" or (node.op_type in ("MatMul", "Gemm") and weights
                                           and not any(feed_forward in shape for shape in weights)):
            chosen.append(node.name)
    return chosen


_quiet_quantiser = onnx_cache.quiet_root_logger


def _quantise(source: Path, target: Path, feed_forward: int) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Weights int8 per output channel, activations quantised on the fly per batch; fused ops have no type
    # information for the quantiser, hence DefaultTensorType.
    with _quiet_quantiser():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=_weight_nodes(source, feed_forward),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def export_int8(model: TransResNet, folder: Path, key: dict[str, Any]) -> None:
    """Export, fuse and quantise ``model``'s transformer into ``folder``, published in one step."""
    started = time.perf_counter()

    def build(staging: Path) -> dict[str, Any]:
        names = _export_float(model, staging / "float.onnx")
        fused = staging / "fused.onnx"
        _quantise(fused if _fuse(model, staging / "float.onnx", fused) else staging / "float.onnx",
                  staging / MODEL_FILE, int(getattr(model.text.transformer.config, "intermediate_size", 0)))
        for leftover in ("float.onnx", "fused.onnx"):
            (staging / leftover).unlink(missing_ok=True)
        return {"inputs": names}

    onnx_cache.publish_export(folder, key, MODEL_FILE, build)
    onnx_cache.timed("the int8 text encoder", started, folder)


def export_float(model: TransResNet, folder: Path, key: dict[str, Any]) -> None:
    """Export ``model``'s float32 transformer, unfused, into ``folder``, published in one step."""
    started = time.perf_counter()
    onnx_cache.publish_export(folder, key, FLOAT_FILE,
                              lambda staging: {"inputs": _export_float(model, staging / FLOAT_FILE)})
    onnx_cache.timed("the float32 text encoder", started, folder)


# -------------------------------------------------------------------------------------------- load


def _hidden(run: Callable[[dict[str, np.ndarray]], np.ndarray], inputs: Sequence[str],
            batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token tensors -> an export's float32 hidden states, on the tokens' device."""
    device = batch["input_ids"].device
    feed = {name: batch[name].cpu().numpy().astype(np.int64, copy=False) for name in inputs}
    return torch.from_numpy(run(feed)).to(device)


class Int8Transformer:
    """Callable like ``transformer(**batch).last_hidden_state``: token tensors -> float32 hidden states."""

    def __init__(self, folder: Path, inputs: Sequence[str], threads: int) -> None:
        self.session = onnx_cache.open_session(folder / MODEL_FILE, threads)
        self.inputs = list(inputs)
        self.folder = folder

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return _hidden(lambda feed: self.session.run(["hidden"], feed)[0], self.inputs, batch)


class OpenVinoTransformer:
    """Callable like :class:`Int8Transformer`: the float32 export compiled by OpenVINO, run in bfloat16.

    Compiled with one stream per thread: ``concurrency`` calls from as many threads run side by side
    (what :func:`transresnet.encode.encode_captions` does); a lone call runs on one stream's thread."""

    def __init__(self, folder: Path, inputs: Sequence[str], threads: int) -> None:
        self.model = openvino_runtime.CompiledOnnx(folder / FLOAT_FILE, threads, "bf16", streams=threads)
        self.inputs = list(inputs)
        self.folder = folder

    @property
    def concurrency(self) -> int:
        return self.model.streams

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return _hidden(self.model, self.inputs, batch)


def _read_cached(folder: Path, key: dict[str, Any], threads: int) -> Int8Transformer | None:
    """The cached export if it is complete, for this key, and intact; None (with the reason logged) if not."""
    meta = onnx_cache.read_verified(folder, key, MODEL_FILE)
    if meta is None:
        return None
    try:
        return Int8Transformer(folder, meta["inputs"], threads)
    except Exception as err:  # noqa: BLE001 - a file ONNX Runtime cannot open is rebuilt, never served
        logger.warning("cached int8 text encoder %s is unusable (%s); exporting it again", folder, err)
        return None


def load_int8_transformer(model: TransResNet, *, cache_dir: str | Path | None = None) -> Int8Transformer:
    """The int8 transformer of ``model`` (exported on first use, then read from the cache).

    Runs with torch's thread count, so int8 and float32 are compared on the same threads.
    """
    check_supported(model)
    folder, key = export_folder(model, cache_dir)
    threads = torch.get_num_threads()
    cached = _SESSIONS.get(onnx_cache.memo_key(folder, (MODEL_FILE, META), threads))
    if cached is not None:
        return cached
    runner = _read_cached(folder, key, threads)
    if runner is None:
        export_int8(model, folder, key)
        runner = Int8Transformer(folder, json.loads((folder / META).read_text())["inputs"], threads)
    _SESSIONS.put(onnx_cache.memo_key(folder, (MODEL_FILE, META), threads), runner)
    return runner


def check_openvino(model: TransResNet) -> None:
    """Raise (ValueError, ImportError) unless ``model``'s captions can be encoded by ``openvino_bf16`` here."""
    import transresnet.encode as encode  # its bf16 probe, looked up at call time (tests replace it)

    check_supported(model)
    openvino_runtime.require("openvino_bf16 caption encoding", "choose --precision bfloat16 / float32")
    if model.device.type != "cpu":
        raise ValueError("openvino_bf16 runs on the CPU and this model is on a GPU; choose --precision float16")
    if not encode._cpu_has_bf16():
        raise ValueError("openvino_bf16 runs in bfloat16, which this CPU does not have natively; choose "
                         "--precision float32 or int8")


def load_openvino_transformer(model: TransResNet, *, cache_dir: str | Path | None = None) -> OpenVinoTransformer:
    """``model``'s transformer compiled by OpenVINO in bfloat16 (its float32 export made on first use).

    The caller checks :func:`check_openvino` first. Runs with torch's thread count, like the int8 one.
    """
    folder, key = export_folder(model, cache_dir, quantised=False)
    threads = torch.get_num_threads()
    memo = onnx_cache.memo_key(folder, (FLOAT_FILE, META), threads)
    cached = _SESSIONS.get(memo)
    if cached is not None:
        return cached
    meta = onnx_cache.read_verified(folder, key, FLOAT_FILE)
    if meta is None:
        export_float(model, folder, key)
        meta = json.loads((folder / META).read_text())
    runner = OpenVinoTransformer(folder, meta["inputs"], threads)
    _SESSIONS.put(onnx_cache.memo_key(folder, (FLOAT_FILE, META), threads), runner)
    return runner
