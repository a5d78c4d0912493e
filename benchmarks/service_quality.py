"""Score what the service answers: BLEU-1..4, ROUGE-L and CIDEr-D of the top caption it returns for each photo
of a split, in each of ``--modes``, over real HTTP (a `transresnet serve` subprocess on loopback, the server a
user reaches), beside the client's latency per request and the share of answers taken from the index.

This is the evaluator's ``--protocol generate`` question asked of the served system: the same photos and
references (:func:`transresnet.generation.data.group_queries`), the same scorers
(:func:`transresnet.generation.metrics.caption_scores`), but the answers come from the service's own decode,
retrieval, beam search and re-ranking.

    grep -v -F -f <(awk -F, '$2 == "val" {print $1}' ../shared/data/flickr8k-1k/captions.csv | sort -u) \
        ../shared/data/flickr8k-captions/captions.csv > /tmp/pool-without-val.csv
    transresnet index build --checkpoint runs/flickr8k/best --captions /tmp/pool-without-val.csv --out INDEX
    python benchmarks/service_quality.py --checkpoint runs/flickr8k/best --index INDEX \
        --generator runs/flickr8k_updown_effnet/best --data ../shared/data/flickr8k-1k/captions.csv --split val \
        --beam-size 16 --out benchmarks/results/service_quality.json

The index should not hold the evaluated photos' own captions: retrieval (and the consensus neighbours) would
find the references themselves and the scores would measure recall of the index, not captioning. The script
counts how many references the index holds and says so.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import ServeProcess, machine, multipart_body, setup_env, table, write_json

logger = logging.getLogger("service_quality")

MODES = ["retrieve", "generate", "hybrid", "generate+consensus", "hybrid+consensus"]


def request_fields(mode: str, beam_size: int) -> dict[str, str]:
    """Form fields of one mode; "hybrid+consensus" is mode hybrid with consensus re-ranking."""
    name, _, rerank = mode.partition("+")
    fields = {"mode": name}
    if name != "retrieve":
        fields["beam_size"] = str(beam_size)
    if rerank == "consensus":
        fields["consensus"] = "true"
    return fields


def references_in_index(index_path: Path, queries: list[Any]) -> int:
    """References of the evaluated photos that the index holds verbatim (up to case and spacing)."""
    from transresnet.index import load_index

    from transresnet.keys import text_key

    held = {text_key(c) for c in load_index(index_path).caption_texts()}
    return sum(text_key(ref) in held for q in queries for ref in q.references)


def answer_all(base_url: str, queries: list[Any], mode: str, beam_size: int) -> dict[str, Any]:
    """The top caption for every query, its source and the client's latency (sequential requests)."""
    import httpx

    captions, sources, latencies = [], [], []
    fields = request_fields(mode, beam_size)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for query in queries:
            traits = [query.trait] if query.trait else []
            body, content_type = multipart_body(query.image_path.read_bytes(), traits, 1,
                                                filename=query.image_path.name, fields=fields)
            start = time.perf_counter()
            response = client.post("/v1/captions", content=body, headers={"content-type": content_type})
            latencies.append((time.perf_counter() - start) * 1000.0)
            if response.status_code != 200:
                raise SystemExit(f"{mode}: {response.status_code} {response.text[:300]}")
            top = response.json()["results"][0]["captions"][0]
            captions.append(top["caption"])
            sources.append(top.get("source", "retrieved"))
    return {"captions": captions, "sources": sources, "latencies_ms": latencies}


def score_mode(mode: str, queries: list[Any], answers: dict[str, Any]) -> dict[str, Any]:
    from transresnet.generation.metrics import caption_scores

    refs = {i: q.references for i, q in enumerate(queries)}
    metrics = caption_scores(refs, dict(enumerate(answers["captions"])))
    from_index = sum(s in ("retrieved", "both") for s in answers["sources"])
    return {"mode": mode, **metrics, "from_index_pct": 100.0 * from_index / len(queries),
            "p50_ms": statistics.median(answers["latencies_ms"]), "queries": len(queries),
            "examples": [{"image": q.image_id, "caption": c} for q, c in zip(queries[:10], answers["captions"],
                                                                             strict=False)]}


def quality_table(rows: list[dict[str, Any]]) -> str:
    return table([[r["mode"], f"{r['bleu_1']:.1f}", f"{r['bleu_4']:.1f}", f"{r['rouge_l']:.1f}",
                   f"{r['cider_d']:.1f}", f"{r['from_index_pct']:.0f}", f"{r['p50_ms']:.0f}"] for r in rows],
                 ["mode", "BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "% from index", "p50 ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the retrieval checkpoint served")
    parser.add_argument("--index", type=Path, required=True, help="its index root (without the split's captions)")
    parser.add_argument("--generator", type=Path, required=True, help="the caption generator served beside it")
    parser.add_argument("--data", type=Path, required=True, help="captions CSV of the photos and references")
    parser.add_argument("--split", default="val")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--beam-size", type=int, default=16, help="beam width of the generative modes")
    parser.add_argument("--consensus-k", type=int, default=10, help="the server's consensus neighbours")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/service_quality.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_env()
    from transresnet.data import load_dataset
    from transresnet.generation.data import group_queries

    queries = group_queries(load_dataset(args.data, split=args.split).records)
    overlap = references_in_index(args.index, queries)
    if overlap:
        logger.warning("the index holds %d of the split's reference captions verbatim (captions of other photos "
                       "can repeat them; many more mean the split's own captions are indexed: build the index from "
                       "a pool without the split's photos, see this script's docstring)", overlap)
    flags = ["--checkpoint", str(args.checkpoint), "--index", str(args.index), "--generator", str(args.generator),
             "--max-beam-size", str(args.beam_size), "--consensus-k", str(args.consensus_k),
             "--threads", str(args.threads), "--device", "cpu"]
    log = Path(args.out or "benchmarks/results/service_quality.json").with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(flags, log)
    rows = []
    try:
        server.start()
        for mode in args.modes:
            rows.append(score_mode(mode, queries, answer_all(server.base_url, queries, mode, args.beam_size)))
            logger.info("%s: CIDEr-D %.1f, BLEU-4 %.1f", mode, rows[-1]["cider_d"], rows[-1]["bleu_4"])
    finally:
        server.stop()
    print(quality_table(rows))
    report = {"checkpoint": str(args.checkpoint), "index": str(args.index), "generator": str(args.generator),
              "data": str(args.data), "split": args.split, "beam_size": args.beam_size,
              "consensus_k": args.consensus_k, "references_in_index": overlap, "machine": machine(), "modes": rows}
    print(f"wrote {write_json(args.out, 'service_quality', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
