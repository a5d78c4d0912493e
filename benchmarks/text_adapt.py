"""Caption-pool adaptation of the text transformer, an experiment: captions of one photo as positives.

The Flickr8k caption pool (``../shared/data/flickr8k-captions``) holds five captions of each of some 7,900
photos, most of which are not on the machine. Their text alone says which captions describe the same scene:
this script fine-tunes the text transformer (default: the bundled all-MiniLM-L6-v2) so that two captions of
one photo sit close, against the other photos' captions in the batch (in-batch negatives, symmetric
cross-entropy over scaled cosines, as sentence-transformers' MultipleNegativesRankingLoss). Photos of
``--exclude`` (the val split, by default) are left out, so val stays unseen. The output folder is a
transformers model folder that a config takes as ``model.text.model``; docs/results.md measures it.

    .venv/bin/python benchmarks/text_adapt.py --pool ../shared/data/flickr8k-captions/captions.csv \\
        --exclude ../shared/data/flickr8k-1k/captions.csv:val --epochs 3 --out runs/tune12/minilm-adapt-e3
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from pathlib import Path

from _common import setup_env

setup_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("text_adapt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=Path, required=True, help="captions CSV (image,caption), photos not needed")
    p.add_argument("--exclude", action="append", default=[], metavar="CSV:SPLIT",
                   help="leave out the photos of this dataset split (repeatable)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="text model to start from (model.text.model)")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=128, help="photos per batch, one caption pair each")
    p.add_argument("--scale", type=float, default=20.0, help="cosine scale of the loss (1 / temperature)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def caption_groups(pool: Path, exclude: list[str]) -> list[list[str]]:
    """The pool's captions grouped by photo, without the excluded splits' photos; photos with two or more."""
    from transresnet.data import load_dataset

    left_out: set[str] = set()
    for spec in exclude:
        path, colon, split = spec.rpartition(":")
        if not (colon and path and split):
            raise SystemExit(f"--exclude {spec!r}: give a dataset and its split as CSV:SPLIT, e.g. captions.csv:val")
        left_out |= {r.image_id for r in load_dataset(path, split=split, require_images=False).records}
    groups: dict[str, list[str]] = {}
    for record in load_dataset(pool, require_images=False).records:
        if record.image_id not in left_out:
            groups.setdefault(record.image_id, []).append(record.caption)
    logger.info("%d photos left out (%s)", len(left_out), ", ".join(exclude) or "none")
    return [g for g in groups.values() if len(g) >= 2]


def adapt(args: argparse.Namespace) -> None:
    from transformers import AutoModel, AutoTokenizer

    from transresnet.encoders import mean_pool, resolve_text_model
    from transresnet.progress import progress

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    groups = caption_groups(args.pool, args.exclude)
    steps_per_epoch = len(groups) // args.batch_size
    steps = args.epochs * steps_per_epoch
    if steps == 0:
        raise SystemExit(f"{len(groups)} photos with two or more captions make no batch of {args.batch_size}; "
                         "lower --batch-size or raise --epochs")
    source = resolve_text_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # Linear warm-up over the first 10% of steps, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1.0, 0.1 * steps)) * max(0.0, (steps - s) / steps))

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        return F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)

    logger.info("%d photos, %d steps of %d caption pairs", len(groups), steps, args.batch_size)
    model.train()
    with progress(steps, "caption-pool adaptation", "steps") as bar:
        for _ in range(args.epochs):
            random.shuffle(groups)  # one pair per photo per batch: no photo is its own negative
            for start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
                pairs = [random.sample(g, 2) for g in groups[start:start + args.batch_size]]
                logits = args.scale * encode([a for a, _ in pairs]) @ encode([b for _, b in pairs]).T
                target = torch.arange(len(pairs))
                loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    # Written beside OUT and renamed into place, so a crash never leaves a half-written model folder there.
    staging = args.out.with_name(f".{args.out.name}.{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    logger.info("wrote %s (last batch loss %.3f)", args.out, loss.item())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    adapt(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
