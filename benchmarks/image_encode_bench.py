"""Image encoding throughput and fidelity of every image runtime, for both shipped backbones, side by side.

For MobileNetV2 (224 px, configs/flickr8k_fast.yaml) and EfficientNet-Lite2 (260 px, configs/flickr8k.yaml)
with their real ImageNet weights from ../shared/weights, each mode of :mod:`transresnet.image_runtime`
(float32, channels_last, bfloat16, compile, onnx, openvino, openvino_bf16, int8) is built the way the library
builds it (int8 calibrated on ``--calibration`` real Flickr8k training photos), as is ``folded`` (the service's float32:
frozen batch norms folded into the convolutions, channels-last), then:

* images/s at batch 1 and batch 8, in interleaved rounds (each round visits every mode, in a rotated
  order, so a busy moment of a shared machine hits all of them); the median over rounds counts, and each
  mode is quoted as a ratio to float32;
* cosine of its pooled features to float32's on ``--photos`` held-out real photos (Flickr8k val);
* what ``auto`` picks for the backbone and why (the library's own check, on the calibration photos).

``--tta flip`` adds a row ``MODE+flip`` per mode: the same engine under test-time augmentation
(:func:`transresnet.features.pooled_features`, the centre crop and its mirror in one batch of twice the
photos), timed in the same interleaved rounds; its images/s count photos, its cosine is to float32+flip.

    .venv/bin/python benchmarks/image_encode_bench.py [--rounds 5] [--threads 2] [--modes ...] [--no-compile]
        [--tta flip]
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, SHARED, loadavg, machine, setup_env, table, timed, write_json  # noqa: E402

setup_env()

import torch  # noqa: E402

logger = logging.getLogger("image_encode_bench")
PHOTOS = SHARED / "data" / "flickr8k-1k"
BACKBONES = {
    "mobilenetv2_100": ("flickr8k_fast.yaml", SHARED / "weights" / "mobilenetv2_100_imagenet.safetensors"),
    "tf_efficientnet_lite2": ("flickr8k.yaml", SHARED / "weights" / "tf_efficientnet_lite2_imagenet.safetensors"),
}
MODES = ("float32", "channels_last", "folded", "bfloat16", "compile", "onnx", "openvino", "openvino_bf16", "int8")
FOLDED = "folded"
"""Not a runtime of its own: the service's float32 (batch norms folded into the convolutions, transresnet.fusion,
then channels-last), measured beside the runtimes it is the reference of."""
BATCHES = (1, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                   help="float32 is the reference and always runs")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (minutes per shape)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median counts")
    p.add_argument("--seconds", type=float, default=1.0, help="least time per mode, batch and round")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    p.add_argument("--calibration", type=int, default=16, help="training photos calibrating int8 and auto")
    p.add_argument("--photos", type=int, default=100, help="held-out photos the cosines are measured on")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="also time every mode with these test-time views (model.image.tta), side by side")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/image_encode_bench.json)")
    return p.parse_args(argv)


def photo_paths(split: str) -> list[Path]:
    from transresnet.data import load_dataset

    records = load_dataset(PHOTOS / "captions.csv", split=split).records
    return sorted({r.image_path for r in records})


def backbone_of(name: str) -> tuple[torch.nn.Module, Any]:
    from transresnet.config import load_config
    from transresnet.encoders import create_backbone

    config_file, weights = BACKBONES[name]
    cfg = load_config(REPO / "configs" / config_file).model.image.model_copy(update={"weights": str(weights)})
    return create_backbone(cfg).eval(), cfg


def per_image_rate(engine: Any, pixels: torch.Tensor, seconds: float) -> float:
    """Images/s: calls repeated for at least ``seconds`` (3 at least), the median call counts."""
    times: list[float] = []
    with torch.inference_mode():
        engine(pixels)  # warm (a compiled engine compiles this shape here)
        while len(times) < 3 or sum(times) < seconds:
            times.append(timed(lambda: engine(pixels))[0])
    return len(pixels) / statistics.median(times)


def cosines(engine: Any, reference: torch.Tensor, photos: torch.Tensor) -> dict[str, float]:
    from transresnet.image_runtime import TIMING_BATCH

    with torch.inference_mode():
        out = torch.cat([engine(photos[i:i + TIMING_BATCH]) for i in range(0, len(photos), TIMING_BATCH)])
    cos = torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1)
    return {"min": float(cos.min()), "p1": float(torch.quantile(cos, 0.01)), "mean": float(cos.mean())}


def folded_engine(backbone: torch.nn.Module, cfg: Any) -> Any:
    from transresnet.fusion import check_sample, folded_for_inference
    from transresnet.image_runtime import TorchEngine

    folded = folded_for_inference(backbone, check_sample(cfg.image_size)).to(memory_format=torch.channels_last)
    return TorchEngine(FOLDED, folded, channels_last=True)


def _runtime(mode: str) -> str:
    """The runtime whose tolerance applies (folded is float32; MODE+flip is MODE's)."""
    mode = mode.split("+")[0]
    return "float32" if mode == FOLDED else mode


def with_views(engines: dict[str, Any], tta: str) -> dict[str, Any]:
    """Each engine under the test-time views ``tta``, named ``MODE+tta`` (the library's own averaging)."""
    from transresnet.features import pooled_features

    return {f"{mode}+{tta}": functools.partial(pooled_features, engine, tta=tta) for mode, engine in engines.items()}


def bench_backbone(name: str, args: argparse.Namespace, modes: list[str], cache: Path) -> dict[str, Any]:
    from transresnet import image_runtime as ir

    backbone, cfg = backbone_of(name)
    calibration = ir.calibration_from_files(photo_paths("train"), cfg, args.calibration)
    held_out = ir.calibration_from_files(photo_paths("val"), cfg, args.photos)
    builder = ir.EngineBuilder(backbone, cfg, cache, calibration)
    engines, build_s = {}, {}
    for mode in modes:
        build = builder.build if mode != FOLDED else lambda _: folded_engine(backbone, cfg)
        build_s[mode], engines[mode] = timed(lambda mode=mode, build=build: build(mode))
        if mode == "compile":  # compiling happens on first call of each shape: part of its cost
            build_s[mode] += sum(timed(lambda e=engines[mode], b=b: per_image_rate(e, held_out[:b], 0.0))[0]
                                 for b in BATCHES)
        logger.info("%s: built %s in %.1fs", name, mode, build_s[mode])
    if args.tta != "none":
        views = with_views(engines, args.tta)
        build_s.update({tta_mode: build_s[tta_mode.split("+")[0]] for tta_mode in views})
        engines.update(views)
        modes = [*modes, *views]
    with torch.inference_mode():
        reference = ir.TorchEngine("float32", backbone)(held_out)
        references = {"none": reference}
        if args.tta != "none":
            references[args.tta] = engines[f"float32+{args.tta}"](held_out)
    rates: dict[str, dict[int, list[float]]] = {m: {b: [] for b in BATCHES} for m in modes}
    for round_no in range(args.rounds):
        order = modes[round_no % len(modes):] + modes[:round_no % len(modes)]
        for mode in order:
            for batch in BATCHES:
                rates[mode][batch].append(per_image_rate(engines[mode], held_out[:batch], args.seconds))
        logger.info("%s: round %d of %d done (load %s)", name, round_no + 1, args.rounds, loadavg())
    started = time.perf_counter()
    auto = ir.prepare_backbone(backbone, cfg, "auto", calibration=calibration, cache_dir=cache)
    results = {}
    for mode in modes:
        medians = {b: statistics.median(rates[mode][b]) for b in BATCHES}
        results[mode] = {"images_per_s": medians, "rounds": rates[mode], "build_s": build_s[mode],
                         "cosine": cosines(engines[mode], references[mode.partition("+")[2] or "none"], held_out),
                         "tolerance": ir.tolerance(_runtime(mode)),
                         "auto_tolerance": ir.tolerance(_runtime(mode), auto=True)}
    return {"backbone": name, "image_size": cfg.image_size, "modes": results,
            "auto": {**auto.report.to_dict(), "seconds": time.perf_counter() - started}}


def rows_of(result: dict[str, Any]) -> list[list[Any]]:
    base = result["modes"]["float32"]["images_per_s"]
    rows = []
    for mode, r in result["modes"].items():
        ips, cos = r["images_per_s"], r["cosine"]
        passes = " / ".join("yes" if cos["min"] >= bound else "no" for bound in (r["tolerance"], r["auto_tolerance"]))
        if mode == "float32":
            passes = "reference"
        rows.append([f"{result['backbone']} {result['image_size']}px", mode, round(ips[1], 1),
                     f"{ips[1] / base[1]:.2f}x", round(ips[8], 1), f"{ips[8] / base[8]:.2f}x",
                     f"{cos['min']:.4f} / {cos['mean']:.4f}", passes, round(r["build_s"], 1)])
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["float32"] + [m for m in args.modes if m != "float32" and not (args.no_compile and m == "compile")]
    started_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="image-bench-") as cache:  # fresh exports: build_s is real
        results = [bench_backbone(name, args, modes, Path(cache)) for name in args.backbones]
    header = ["backbone", "mode", "img/s b1", "vs float32", "img/s b8", "vs float32",
              "cosine min / mean", "passes asked / auto", "build s"]
    rows = [row for result in results for row in rows_of(result)]
    print(table(rows, header))
    for result in results:
        print(f"auto on {result['backbone']}: {result['auto']['chosen']} ({result['auto']['reason']})")
    data = {"machine": machine(), "loadavg_start": started_load, "loadavg_end": loadavg(),
            "threads": args.threads, "rounds": args.rounds, "calibration_photos": args.calibration,
            "held_out_photos": args.photos, "torch": torch.__version__, "results": results}
    path = write_json(args.out, "image_encode_bench", data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
