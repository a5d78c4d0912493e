"""Image encoder runtimes: the checkpoint's backbone (pixels -> pooled features) run several ways, each one
checked against float32 on this model before it is used.

Modes (:data:`transresnet.options.ImagePrecision`):

- ``float32``: the eager torch backbone, the reference every other mode is checked against;
- ``channels_last``: the same weights in NHWC layout (oneDNN / cuDNN convolutions cost less);
- ``bfloat16``: torch autocast over the channels-last copy (native on CPUs with AVX-512 BF16 / AMX);
- ``compile``: ``torch.compile`` of the channels-last copy (explicit only: compiling costs minutes per batch
  shape on a small CPU and was not faster here; docs/results.md);
- ``onnx``: the backbone and its pooling exported to ONNX and run by ONNX Runtime in float32;
- ``openvino``: the same float32 export compiled and run by OpenVINO (the ``openvino`` extra; about 1.3-1.8x
  ONNX Runtime's float32 here at batch 1, docs/results.md);
- ``openvino_bf16``: OpenVINO in bfloat16 (CPUs with native bfloat16 only);
- ``int8``: the ``onnx`` export statically quantised (QDQ; uint8 activations with ranges calibrated on photos,
  int8 weights per output channel);
- ``auto``: every mode this machine offers is built and measured on the calibration photos, and the fastest
  whose features (and image-MLP outputs) stay within cosine 0.999 of float32 is used (a tighter bound than
  an explicit bfloat16 / int8 gets: see :func:`tolerance`); float32 when none is faster. The choice and
  why are logged and kept in :attr:`ImageRunner.report`.

An explicit mode is checked too and refused (ValueError) when it drifts; an export mode without its packages
runs as PyTorch's nearest mode with a warning (:data:`FALLBACKS`). Exports are cached by
:mod:`transresnet.onnx_cache` (beside the checkpoint, keyed by the backbone's fingerprint, the mode, the input
size, the calibration photos for int8, the recipe and the runtime versions).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import transresnet.onnx_cache as onnx_cache
import transresnet.openvino_runtime as openvino_runtime
from transresnet.checkpoint import state_dict_digest
from transresnet.config import DataConfig, ImageEncoderConfig
from transresnet.encode import MIN_COSINE, MIN_COSINE_INT8, _cpu_has_bf16
from transresnet.model import TransResNet
from transresnet.options import ImagePrecision, choices
from transresnet.runtime import eval_mode

logger = logging.getLogger(__name__)

PRECISIONS = choices(ImagePrecision)
AUTO_CANDIDATES = ("int8", "openvino_bf16", "openvino", "onnx", "bfloat16", "channels_last")
"""What ``auto`` measures besides float32 (compile is left out: its compile time at every load)."""
OPENVINO_MODES = ("openvino", "openvino_bf16")
CPU_MODES = ("onnx", "int8", *OPENVINO_MODES)
"""The modes that run an ONNX export (ONNX Runtime or OpenVINO): CPU only, and they need the onnx extra."""
EXACT_MODES = ("channels_last", "compile", "onnx", "openvino")
"""float32 arithmetic in another layout or runtime: held to the tight bound, a drift there is a bug."""
CALIBRATION_IMAGES = 16
TIMING_BATCH = 8
EXPORT_VERSION = 1
"""Bump when the export or quantisation recipe changes: every cached image export is then rebuilt."""
OPSET = 17
INT8_RECIPE = "QDQ, uint8 activations (MinMax over the calibration photos), int8 weights per channel"
_SESSIONS = onnx_cache.SessionMemo()


def tolerance(precision: str, overrides: dict[str, float] | None = None, *, auto: bool = False) -> float:
    """The least cosine to float32 a calibration photo's features may have for ``precision`` to be used.

    Asked for by name: the caption side's bounds, 0.999 for the float32 runtimes and 0.99 for bfloat16 and
    int8. Chosen by ``auto``: 0.999 for every mode, because 0.99 does not keep recall for image features:
    static int8 at min cosine 0.993-0.996 (mean 0.997) lost 1.1-1.7 points of image->caption R@10 on the
    Flickr8k voices checkpoint, where the caption side's int8 at 0.994 lost none (docs/results.md).
    """
    if overrides and precision in overrides:
        return overrides[precision]
    if precision == "float32":
        return -1.0
    return MIN_COSINE if auto or precision in EXACT_MODES else MIN_COSINE_INT8


# ------------------------------------------------------------------------------- calibration photos


def synthetic_calibration(cfg: ImageEncoderConfig, count: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth colour fields with edges, normalised like photos (a fallback only: real photos
    set int8's activation ranges better)."""
    generator = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    coarse = torch.rand(count, 3, 6, 6, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    edges = (torch.rand(count, 1, size, size, generator=generator) > 0.97).float()
    images = (images * 0.8 + edges * 0.2).clamp(0, 1)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (images - mean) / std


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count)]


def calibration_from_files(paths: Sequence[Path], cfg: ImageEncoderConfig, count: int = CALIBRATION_IMAGES
                           ) -> torch.Tensor | None:
    """Up to ``count`` of ``paths`` (spread over them), decoded and preprocessed; None when none reads."""
    from transresnet.images import ImagePreprocessor

    preprocessor = ImagePreprocessor(cfg)
    pixels = []
    for path in spread(sorted(dict.fromkeys(Path(p) for p in paths)), count):
        try:
            pixels.append(preprocessor.load(path))
        except (OSError, ValueError) as err:
            logger.debug("calibration photo %s skipped: %s", path, err)
    return torch.stack(pixels) if pixels else None


def held_out_photos(data: DataConfig) -> list[Path]:
    """The validation photos of a checkpoint's training data where they are on this machine, else the photos
    in the ``images/`` folder beside ``data.train``; [] when neither is (the service's calibration set)."""
    from transresnet.data import load_dataset

    source, split = (data.val, None) if data.val else (data.train, data.val_split)
    if source:
        try:
            records = load_dataset(source, split=split, image_dir=data.image_dir).records
            if records:
                return sorted({r.image_path for r in records})
        except (OSError, ValueError) as err:
            logger.debug("no validation photos from %s: %s", source, err)
    folder = Path(data.train).resolve().parent / "images" if data.train else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))


# ------------------------------------------------------------------------------------------ engines


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TorchEngine:
    """A torch module run on pixels in a memory format, optionally under autocast."""

    name: str
    module: Callable[[torch.Tensor], torch.Tensor]
    channels_last: bool = False
    dtype: torch.dtype | None = None
    identity: str = ""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(pixels.device, self.dtype):
            return self.module(pixels).float()


class OrtEngine:
    """An exported backbone in ONNX Runtime: float32 pixels (B, 3, H, W) -> float32 features (B, F)."""

    def __init__(self, name: str, folder: Path, model_file: str, threads: int) -> None:
        self.name = name
        self.folder = folder
        self.session = onnx_cache.open_session(folder / model_file, threads)
        self.identity = f"{name}:{folder.name}"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        feed = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = self.session.run(["features"], {"pixels": feed})
        return torch.from_numpy(features).to(pixels.device)


class OpenVinoEngine:
    """The float32 ONNX export compiled by OpenVINO, in float32 (``openvino``) or bfloat16 (``openvino_bf16``)."""

    def __init__(self, name: str, folder: Path, model_file: str, threads: int) -> None:
        self.name = name
        self.folder = folder
        self.model = openvino_runtime.CompiledOnnx(folder / model_file, threads,
                                                   "bf16" if name == "openvino_bf16" else "f32")
        self.identity = f"{name}:{folder.name}"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        feed = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.model({"pixels": feed})).to(pixels.device)


Engine = TorchEngine | OrtEngine | OpenVinoEngine


def image_fingerprint(backbone: nn.Module, cfg: ImageEncoderConfig) -> str:
    """Hash of the backbone's architecture and weights (what an export of it depends on)."""
    digest = hashlib.sha256(json.dumps({"backbone": cfg.backbone, "kwargs": cfg.backbone_kwargs},
                                       sort_keys=True).encode())
    return state_dict_digest(backbone, digest).hexdigest()[:32]


def _export_float(backbone: nn.Module, size: int, path: Path) -> None:
    """The float32 backbone with its pooling as ONNX, dynamic batch, ``size`` x ``size`` pixels."""
    module = copy.deepcopy(backbone).float().cpu().eval()
    sample = torch.zeros(1, 3, size, size)
    axes = {"pixels": {0: "batch"}, "features": {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python (timm's padding)
        torch.onnx.export(module, (sample,), str(path), input_names=["pixels"], output_names=["features"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _quantise_static(source: Path, target: Path, calibration: torch.Tensor) -> None:
    """Static int8 (QDQ) of ``source`` with activation ranges from ``calibration``.

    uint8 activations with int8 per-channel weights ran 1.5-2x ONNX Runtime's float32 here and kept
    MobileNetV2 within cosine 0.99; int8 activations (s8s8) were slower and no closer, and percentile or
    entropy calibration moved features further (docs/results.md).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, pixels: np.ndarray) -> None:
            self.batches = iter([{"pixels": pixels[i:i + TIMING_BATCH]} for i in range(0, len(pixels), TIMING_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = target.with_name("prepared.onnx")
    with onnx_cache.quiet_root_logger():
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Batches(calibration.float().cpu().contiguous().numpy()),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)


def calibration_digest(calibration: torch.Tensor) -> str:
    return hashlib.sha256(calibration.float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def export_key(mode: str, fingerprint: str, size: int, calibration: torch.Tensor | None) -> dict[str, Any]:
    """Everything an image export depends on: a change to any of it means a new export."""
    key: dict[str, Any] = {"fingerprint": fingerprint, "mode": mode, "input": [3, size, size],
                           "export_version": EXPORT_VERSION, "opset": OPSET,
                           **onnx_cache.runtime_versions(f"the {mode} image encoder", "choose --image-precision "
                                                         "float32 / channels_last / bfloat16")}
    if mode == "int8":
        assert calibration is not None, "int8 needs calibration photos"
        key.update(calibration=calibration_digest(calibration), recipe=INT8_RECIPE)
    return key


def ensure_export(mode: str, backbone: nn.Module, cfg: ImageEncoderConfig, *, cache_root: Path,
                  calibration: torch.Tensor | None = None, fingerprint: str | None = None) -> tuple[Path, str]:
    """The folder and file name of ``backbone``'s ``onnx`` (float32) or ``int8`` export: a verified one from
    the cache, else exported (and quantised) into it first."""
    fingerprint = fingerprint or image_fingerprint(backbone, cfg)
    key = export_key(mode, fingerprint, cfg.image_size, calibration)
    folder = onnx_cache.keyed_folder(cache_root, f"image-{mode}", key)
    model_file = f"image.{mode}.onnx"
    if onnx_cache.read_verified(folder, key, model_file) is None:
        started = time.perf_counter()

        def build(staging: Path) -> dict[str, Any]:
            if mode == "onnx":
                _export_float(backbone, cfg.image_size, staging / model_file)
            else:
                _export_float(backbone, cfg.image_size, staging / "float.onnx")
                _quantise_static(staging / "float.onnx", staging / model_file, calibration)
                (staging / "float.onnx").unlink()
            return {}

        onnx_cache.publish_export(folder, key, model_file, build)
        onnx_cache.timed(f"the {mode} image encoder", started, folder)
    return folder, model_file


def load_ort_engine(mode: str, backbone: nn.Module, cfg: ImageEncoderConfig, *, cache_root: Path,
                    calibration: torch.Tensor | None = None, fingerprint: str | None = None) -> OrtEngine:
    """The ``onnx`` / ``int8`` engine of ``backbone`` in ONNX Runtime (its export made first when needed)."""
    folder, model_file = ensure_export(mode, backbone, cfg, cache_root=cache_root, calibration=calibration,
                                       fingerprint=fingerprint)
    threads = torch.get_num_threads()
    memo = onnx_cache.memo_key(folder, (model_file, onnx_cache.META), threads)
    engine = _SESSIONS.get(memo)
    if engine is None:
        engine = OrtEngine(mode, folder, model_file, threads)
        _SESSIONS.put(memo, engine)
    return engine


def load_openvino_engine(mode: str, backbone: nn.Module, cfg: ImageEncoderConfig, *, cache_root: Path,
                         fingerprint: str | None = None) -> OpenVinoEngine:
    """The ``openvino`` / ``openvino_bf16`` engine: OpenVINO compiling the float32 ``onnx`` export."""
    openvino_runtime.require(f"the {mode} image encoder", "choose --image-precision onnx / channels_last")
    if mode == "openvino_bf16" and not _cpu_has_bf16():
        raise ValueError("openvino_bf16 runs in bfloat16, which this CPU does not have natively; choose "
                         "--image-precision openvino (float32)")
    folder, model_file = ensure_export("onnx", backbone, cfg, cache_root=cache_root, fingerprint=fingerprint)
    threads = torch.get_num_threads()
    stats = onnx_cache.memo_key(folder, (model_file, onnx_cache.META), threads)
    memo = None if stats is None else (mode, *stats)
    engine = _SESSIONS.get(memo)
    if engine is None:
        engine = OpenVinoEngine(mode, folder, model_file, threads)
        _SESSIONS.put(memo, engine)
    return engine


@dataclass
class EngineBuilder:
    """Builds the engines of one backbone, sharing the channels-last copy and the fingerprint between them."""

    backbone: nn.Module
    cfg: ImageEncoderConfig
    cache_root: Path
    calibration: torch.Tensor
    _channels_last: nn.Module | None = None
    _fingerprint: str | None = None

    def channels_last(self) -> nn.Module:
        if self._channels_last is None:
            self._channels_last = copy.deepcopy(self.backbone).eval().to(memory_format=torch.channels_last)
        return self._channels_last

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = image_fingerprint(self.backbone, self.cfg)
        return self._fingerprint

    def build(self, mode: str) -> Engine:
        if mode == "float32":
            return TorchEngine("float32", self.backbone, identity="float32")
        if mode == "channels_last":
            return TorchEngine(mode, self.channels_last(), channels_last=True, identity=mode)
        if mode == "bfloat16":
            return TorchEngine(mode, self.channels_last(), channels_last=True, dtype=torch.bfloat16, identity=mode)
        if mode == "compile":
            return TorchEngine(mode, torch.compile(self.channels_last()), channels_last=True, identity=mode)
        if mode in CPU_MODES and next(self.backbone.parameters()).device.type != "cpu":
            raise ValueError(f"the {mode} image encoder runs on the CPU; this model is on a GPU")
        if mode in ("onnx", "int8"):
            return load_ort_engine(mode, self.backbone, self.cfg, cache_root=self.cache_root,
                                   calibration=self.calibration, fingerprint=self.fingerprint())
        if mode in OPENVINO_MODES:
            return load_openvino_engine(mode, self.backbone, self.cfg, cache_root=self.cache_root,
                                        fingerprint=self.fingerprint())
        raise ValueError(f"unknown image precision {mode!r}; choose one of {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------------------------- checking


@dataclass
class CandidateResult:
    """One mode measured on the calibration photos against float32."""

    name: str
    tolerance: float
    passed: bool = False
    min_cosine: float | None = None
    """Least cosine to float32 over the photos' pooled features."""
    min_query_cosine: float | None = None
    """The same after the image MLP (the image side of the query vectors)."""
    batch1_ms: float | None = None
    per_image_ms: float | None = None
    """Per-image time at a batch of ``TIMING_BATCH`` (or all the photos, when fewer)."""
    error: str | None = None

    @property
    def cost(self) -> float:
        """What auto minimises: the geometric mean of the per-image times at batch 1 and at batch 8 (a
        server sees both: single requests when quiet, micro-batches under load)."""
        return float(np.sqrt((self.batch1_ms or np.inf) * (self.per_image_ms or np.inf)))


@dataclass
class ImageEncoderReport:
    requested: str
    chosen: str
    reason: str
    calibration: str
    """Where the calibration photos came from ("16 photos", or "synthetic: ...")."""
    candidates: list[CandidateResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best_ms(run: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls: on a shared machine other processes only ever add time (medians of
    3 calls at load average 15 on 2 cores ranked float32 above ONNX Runtime, which the benchmark refutes)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return min(times)


def _features(engine: Engine, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([engine(pixels[i:i + TIMING_BATCH]) for i in range(0, len(pixels), TIMING_BATCH)])


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


@dataclass
class _Reference:
    features: torch.Tensor
    queries: torch.Tensor


def measure(engine: Engine, calibration: torch.Tensor, reference: _Reference, mlp: nn.Module, tol: float,
            *, timing: bool = True) -> CandidateResult:
    """Cosine of ``engine``'s features (and image-MLP outputs) to float32's on the photos, and its speed."""
    result = CandidateResult(engine.name, tol)
    with torch.inference_mode(), eval_mode(mlp):
        features = _features(engine, calibration)  # also the warm-up of the timings below
        result.min_cosine = _min_cosine(features, reference.features)
        result.min_query_cosine = _min_cosine(mlp(features.to(reference.queries.device)), reference.queries)
        if timing:
            batch = calibration[:TIMING_BATCH]
            result.batch1_ms = _best_ms(lambda: engine(calibration[:1]))
            result.per_image_ms = _best_ms(lambda: engine(batch)) / len(batch)
    result.passed = min(result.min_cosine, result.min_query_cosine) >= tol and bool(torch.isfinite(features).all())
    return result


def _reference(backbone: nn.Module, mlp: nn.Module, calibration: torch.Tensor) -> _Reference:
    engine = TorchEngine("float32", backbone)
    with torch.inference_mode(), eval_mode(mlp):
        features = _features(engine, calibration)
        return _Reference(features, mlp(features))


# ------------------------------------------------------------------------------------------ runner


class ImageRunner(nn.Module):
    """``runner(pixels) -> pooled features``, like the backbone it wraps, through the chosen engine.

    The eager float32 backbone stays a child: ``forward_features`` (grid features) and the weights are its.
    """

    def __init__(self, backbone: nn.Module, engine: Engine, report: ImageEncoderReport) -> None:
        super().__init__()
        self.backbone = backbone
        self.engine = engine
        self.report = report
        self.num_features = int(getattr(backbone, "num_features", 0))

    @property
    def precision(self) -> str:
        return self.engine.name

    @property
    def identity(self) -> str:
        """Names the engine and, for exports, the export (part of the feature-cache key)."""
        return self.engine.identity or self.engine.name

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.engine(pixels)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(pixels)


def eager_backbone(model: TransResNet) -> nn.Module:
    """The model's own torch backbone, unwrapped from an installed :class:`ImageRunner`."""
    backbone = model.backbone
    return backbone.backbone if isinstance(backbone, ImageRunner) else backbone


def _missing_for(mode: str) -> list[str]:
    """The packages ``mode`` needs that this machine lacks (an OpenVINO mode compiles the onnx extra's export)."""
    if mode not in CPU_MODES:
        return []
    missing = onnx_cache.missing_packages()
    return missing + ["openvino"] if mode in OPENVINO_MODES and openvino_runtime.missing() else missing


def _auto_candidates(device: torch.device, candidates: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The modes auto measures here and, for the log, those it skips and why."""
    wanted, skipped = [], []
    for mode in AUTO_CANDIDATES if candidates is None else candidates:
        missing = _missing_for(mode)
        if mode in CPU_MODES and device.type != "cpu":
            skipped.append(f"{mode} (on a GPU)")
        elif missing:
            skipped.append(f"{mode} (no {' and '.join(missing)})")
        elif mode in ("bfloat16", "openvino_bf16") and device.type == "cpu" and not _cpu_has_bf16():
            skipped.append(f"{mode} (bfloat16 is not native on this CPU)")
        else:
            wanted.append(mode)
    return wanted, skipped


FALLBACKS = {"onnx": "channels_last", "int8": "channels_last", "openvino": "channels_last",
             "openvino_bf16": "bfloat16"}
"""What an explicit export mode runs as when its packages are missing: torch's version of the same arithmetic
(int8 excepted: its nearest without ONNX Runtime is float32)."""


def _fallback(precision: str, device: torch.device) -> tuple[str, str]:
    """An explicit export mode without its packages runs as PyTorch's :data:`FALLBACKS` mode, with a warning."""
    missing = _missing_for(precision)
    if missing and device.type == "cpu":
        hint = openvino_runtime.INSTALL_HINT if "openvino" in missing else onnx_cache.INSTALL_HINT
        fallback = FALLBACKS[precision]
        reason = f"{precision} needs {' and '.join(missing)} ({hint}); running the PyTorch {fallback} encoder instead"
        logger.warning("image encoder: %s", reason)
        return fallback, reason
    return precision, ""


def prepare_image_encoder(model: TransResNet, precision: str = "auto", *, calibration: torch.Tensor | None = None,
                          cache_dir: str | Path | None = None, checkpoint_dir: Path | None = None,
                          candidates: Sequence[str] | None = None, tolerances: dict[str, float] | None = None
                          ) -> ImageRunner:
    """The image encoder of ``model`` in ``precision``, checked on ``calibration`` (preprocessed photos,
    (N, 3, H, W); a deterministic synthetic set when None, said in the log).

    ``auto`` measures float32 and ``candidates`` (default :data:`AUTO_CANDIDATES`, less what this machine
    lacks) and takes the fastest that passes its :func:`tolerance` (``tolerances`` overrides bounds by mode)
    on both the pooled features and the image MLP's outputs. An explicit mode that fails its check raises
    ValueError. ``cache_dir``: where ONNX exports go (default: :func:`transresnet.onnx_cache.cache_root` of
    ``checkpoint_dir``).
    """
    return prepare_backbone(eager_backbone(model), model.config.image, precision, mlp=model.image_mlp,
                            calibration=calibration, cache_dir=cache_dir, checkpoint_dir=checkpoint_dir,
                            candidates=candidates, tolerances=tolerances)


def prepare_backbone(backbone: nn.Module, cfg: ImageEncoderConfig, precision: str = "auto", *,
                     mlp: nn.Module | None = None, calibration: torch.Tensor | None = None,
                     cache_dir: str | Path | None = None, checkpoint_dir: Path | None = None,
                     candidates: Sequence[str] | None = None, tolerances: dict[str, float] | None = None
                     ) -> ImageRunner:
    """:func:`prepare_image_encoder` for a bare backbone (``mlp``: what follows it, checked too; none here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown image precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    backbone = backbone.eval()
    mlp = mlp if mlp is not None else nn.Identity()
    device = next(backbone.parameters()).device
    if precision == "float32":  # the reference itself: nothing to check
        return ImageRunner(backbone, TorchEngine("float32", backbone, identity="float32"),
                           ImageEncoderReport("float32", "float32", "asked for", "none"))
    source = f"{len(calibration)} photos" if calibration is not None else ""
    if calibration is None:
        calibration = synthetic_calibration(cfg)
        source = f"synthetic: {len(calibration)} generated images (no calibration photos given)"
        logger.warning("image encoder: no calibration photos; checking %s on %s", precision, source)
    calibration = calibration.to(device)
    builder = EngineBuilder(backbone, cfg, onnx_cache.cache_root(checkpoint_dir, cache_dir), calibration)
    if precision == "auto":
        return _choose(builder, mlp, device, source, candidates, tolerances)
    return _explicit(builder, mlp, device, precision, source, tolerances)


def _explicit(builder: EngineBuilder, mlp: nn.Module, device: torch.device, precision: str, source: str,
              tolerances: dict[str, float] | None) -> ImageRunner:
    mode, reason = _fallback(precision, device)
    engine = builder.build(mode)
    reference = _reference(builder.backbone, mlp, builder.calibration)
    result = measure(engine, builder.calibration, reference, mlp, tolerance(mode, tolerances), timing=False)
    if not result.passed:
        raise ValueError(f"the {mode} image encoder drifts from float32 on this model: min cosine "
                         f"{min(result.min_cosine or 0, result.min_query_cosine or 0):.5f} < {result.tolerance} on "
                         f"{source}; choose --image-precision auto or float32")
    reason = reason or f"asked for; min cosine to float32 {result.min_cosine:.5f} on {source}"
    logger.info("image encoder: %s (%s)", mode, reason)
    return ImageRunner(builder.backbone, engine, ImageEncoderReport(precision, mode, reason, source, [result]))


def _try(builder: EngineBuilder, mode: str, reference: _Reference, mlp: nn.Module,
         tolerances: dict[str, float] | None) -> tuple[CandidateResult, Engine | None]:
    """Build and measure one candidate; a candidate that fails to build or run is recorded, not raised."""
    try:
        engine = builder.build(mode)
        return measure(engine, builder.calibration, reference, mlp, tolerance(mode, tolerances, auto=True)), engine
    except Exception as err:  # noqa: BLE001 - auto skips a runtime that does not work here, saying why
        logger.warning("image encoder: %s does not run here (%s: %s)", mode, type(err).__name__, err)
        return CandidateResult(mode, tolerance(mode, tolerances, auto=True), error=f"{type(err).__name__}: {err}"), None


def _choose(builder: EngineBuilder, mlp: nn.Module, device: torch.device, source: str,
            candidates: Sequence[str] | None, tolerances: dict[str, float] | None) -> ImageRunner:
    wanted, skipped = _auto_candidates(device, candidates)
    reference = _reference(builder.backbone, mlp, builder.calibration)
    results = [measure(builder.build("float32"), builder.calibration, reference, mlp, -1.0)]
    engines: dict[str, Engine] = {"float32": builder.build("float32")}
    for mode in wanted:
        result, engine = _try(builder, mode, reference, mlp, tolerances)
        results.append(result)
        if engine is not None:
            engines[mode] = engine
    for result in results[1:]:
        if result.error is None and not result.passed:
            logger.warning("image encoder: %s drifts from float32 (min cosine %.5f, after the MLP %.5f < %.3f)",
                           result.name, result.min_cosine, result.min_query_cosine, result.tolerance)
    best = min((r for r in results if r.passed), key=lambda r: r.cost)
    table = ", ".join(_describe(r) for r in results)
    reason = (f"fastest passing on {source}: {table}" + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    logger.info("image encoder: auto chose %s (%s)", best.name, reason)
    return ImageRunner(builder.backbone, engines[best.name], ImageEncoderReport("auto", best.name, reason, source,
                                                                                results))


def _describe(result: CandidateResult) -> str:
    if result.error is not None:
        return f"{result.name} failed to run"
    verdict = "ok" if result.passed else f"drifts, < {result.tolerance}"
    return (f"{result.name} {result.batch1_ms:.1f} ms at batch 1, {result.per_image_ms:.1f} ms/image at batch "
            f"{TIMING_BATCH}, cosine {result.min_cosine:.4f} ({verdict})")


def install_image_encoder(model: TransResNet, runner: ImageRunner) -> None:
    """Make ``model.encode_image`` (and every path through it: the service, the Python API) use ``runner``."""
    model.backbone = runner


def apply_image_precision(model: TransResNet, precision: str, **options: Any) -> ImageEncoderReport:
    """Prepare and install the image encoder once; an already installed one for ``precision`` is kept."""
    current = model.backbone
    if isinstance(current, ImageRunner) and current.report.requested == precision:
        return current.report
    runner = prepare_image_encoder(model, precision, **options)
    install_image_encoder(model, runner)
    return runner.report
