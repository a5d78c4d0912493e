"""OpenVINO's CPU runtime for the encoders' ONNX exports: the same files ONNX Runtime reads, compiled by OpenVINO.

Used by the image encoder modes ``openvino`` / ``openvino_bf16`` (:mod:`transresnet.image_runtime`) and the
caption encoder's ``openvino_bf16`` precision (:mod:`transresnet.onnx_text`). OpenVINO compiles the float32
ONNX export itself (its own graph fusions); ``bf16`` asks its CPU plugin to run in bfloat16, which it only does
where the CPU has native bfloat16 (AVX-512 BF16 / AMX), so that precision is refused elsewhere. Measured here
(docs/results.md): float32 about 1.3-1.8x ONNX Runtime's on the backbones at batch 1, and the caption
transformer in bfloat16 about 1.6x torch's bfloat16.

Needs the ``openvino`` extra (``pip install "transresnet[openvino]"``), beside the ``onnx`` one that exports.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

INSTALL_HINT = 'pip install "transresnet[openvino]"'
Hint = Literal["f32", "bf16"]


class OpenVinoUnavailable(ImportError):
    """An OpenVINO mode was asked for but the openvino extra is not installed."""


def missing() -> bool:
    return importlib.util.find_spec("openvino") is None


def require(what: str, alternative: str) -> str:
    """OpenVINO's version; OpenVinoUnavailable, saying what to install or choose instead, without it."""
    if missing():
        raise OpenVinoUnavailable(f"{what} needs openvino: {INSTALL_HINT}; or {alternative}")
    return importlib.metadata.version("openvino")


class CompiledOnnx:
    """An ONNX file compiled by OpenVINO for the CPU: ``model({name: array}) -> first output`` (float32).

    OpenVINO's infer requests are not thread-safe, so each calling thread gets its own (the service encodes
    on worker threads); they share the compiled model and its weights.
    """

    def __init__(self, path: Path, threads: int, hint: Hint, streams: int = 1) -> None:
        import openvino as ov

        self.path = path
        self.hint = hint
        self.streams = streams
        # One stream (LATENCY) runs each call on all the given threads: the service's batch-1 case. Bulk
        # callers that keep ``streams`` calls in flight (caption encoding) get that many streams sharing the
        # threads (THROUGHPUT): small batches keep every core busy without a sync per layer. bf16 by request.
        mode = {"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else {
            "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams}
        self.compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, **mode})
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = self._request().infer(feeds)
        return np.asarray(result[self.compiled.output(0)], dtype=np.float32)
