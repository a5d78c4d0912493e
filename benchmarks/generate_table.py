"""The paper's retrieval-versus-generation comparison, one command, one table.

Generative rows train a caption generator with the project's trainer (``transresnet train``, i.e.
:func:`transresnet.generation.train.train_generator`, with ``--set`` overrides) and score it with
``transresnet eval --protocol generate`` (:func:`transresnet.generation.evaluate.run_generate_eval`):
BLEU-1..4, ROUGE-L, CIDEr-D (x 100), distinct words, % of captions that are not a training caption verbatim,
and voice accuracy where the data has voices. Flickr8k rows train on the 700 ``train`` photos of
../shared/data/flickr8k-1k and report its 100 ``val`` photos (5 references each); the trait rows train on
the synthetic voiced shapes (drawn on first use into .cache/synthetic) and report their ``test`` split.
Beam rows decode another row's model with another beam size (no retraining).

The retrieval rows caption each val photo with the retrieval model's top-1 caption from the real Flickr8k
caption pool (../shared/data/flickr8k-captions: 40k captions of 8k photos) with every caption of the val
photos left out (else retrieval would return a reference), through the project's index (a flat, exact
``transresnet index build``) and query path (:mod:`transresnet.evaluate`), scored by the same code against
the same references.

    python benchmarks/generate_table.py                      # every row (trains what is missing)
    python benchmarks/generate_table.py --only updown updown-beam5 retrieval --epochs 10
    python benchmarks/generate_table.py --show --markdown    # the JSON's rows as a markdown table

Training runs go to ``runs/generate_table/<run>``; a run is reused when its folder (or any ``runs/*``
folder) holds a finished run of the same resolved config. Scored rows are cached in the JSON by a key of
the config, its overrides, the checkpoint and the scoring options, so a rerun only does what is missing.
Run it from the project root (the configs' paths are relative to it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS, machine, setup_env, table  # the script folder is on sys.path

logger = logging.getLogger("generate_table")

FLICKR = "../shared/data/flickr8k-1k/captions.csv"
POOL = "../shared/data/flickr8k-captions/captions.csv"
SYNTHETIC = ".cache/synthetic/captions.csv"
RUNS = Path("runs/generate_table")
JSON_PATH = RESULTS / "generate_table.json"
METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "meteor", "distinct_words",
           "distinct_captions", "mean_length", "novel_pct", "voice_accuracy", "queries")


@dataclass(frozen=True)
class RowSpec:
    """One row: what trains it (``config`` + ``overrides`` into run folder ``run``) and how it is scored."""

    name: str
    what: str
    kind: str = "generate"
    """generate: a caption generator's captions; retrieval: the retrieval model's top-1 pool caption."""
    config: str | None = None
    overrides: tuple[str, ...] = ()
    run: str | None = None
    """Run folder name under the runs root; rows sharing it share one training (e.g. beam variants)."""
    checkpoint: str | None = None
    """A fixed checkpoint instead of a training (nothing is trained)."""
    data: str = FLICKR
    split: str = "val"
    beam_size: int | None = None
    """Beam size at scoring (None: the config's decoding)."""
    traits: str = "given"
    pool: str = POOL
    note: str = ""


UPDOWN = "configs/flickr8k_updown.yaml"
ROWS: tuple[RowSpec, ...] = (
    RowSpec("retrieval", "retrieval top-1 (TransResNet, configs/flickr8k_fast.yaml, 4 crops), pool without val "
            "photos", kind="retrieval", config="configs/flickr8k_fast.yaml", overrides=("data.augment_crops=4",),
            run="retrieval_fast",
            note="4 cached random crops per training photo instead of the config's 8: on the shared CPU each "
                 "crop of the 800 photos took 11 min to cache"),
    RowSpec("retrieval-voices", "retrieval top-1, runs/flickr8k_voices/best (trained on voiced captions)",
            kind="retrieval", checkpoint="runs/flickr8k_voices/best",
            note="trained on the template-voiced Flickr8k captions (.cache/flickr8k-voices), queried with no trait"),
    RowSpec("showtell", "ShowTell, LSTM (configs/flickr8k_showtell.yaml), beam 3",
            config="configs/flickr8k_showtell.yaml", run="showtell"),
    RowSpec("showatttell", "Show, Attend and Tell, LSTM (configs/flickr8k_showatttell.yaml), beam 3",
            config="configs/flickr8k_showatttell.yaml", run="showatttell"),
    RowSpec("updown", "UpDown, LSTM (configs/flickr8k_updown.yaml), beam 3", config=UPDOWN, run="updown"),
    RowSpec("updown-beam1", "the UpDown model, beam 1", config=UPDOWN, run="updown", beam_size=1),
    RowSpec("updown-beam5", "the UpDown model, beam 5", config=UPDOWN, run="updown", beam_size=5),
    RowSpec("updown-gru", "UpDown, GRU cells, beam 3", config=UPDOWN, overrides=("model.decoder.cell=gru",),
            run="updown_gru"),
    RowSpec("updown-rnn", "UpDown, plain tanh RNN cells, beam 3", config=UPDOWN,
            overrides=("model.decoder.cell=rnn",), run="updown_rnn"),
    RowSpec("updown-pretrain", "UpDown, LSTM, decoder LM-pretrained on the 39k pool (val photos excluded), beam 3",
            config="configs/flickr8k_updown_pretrain.yaml", run="updown_pretrain"),
    RowSpec("synthetic-updown", "UpDown with the personality encoder (configs/synthetic_updown.yaml), beam 3",
            config="configs/synthetic_updown.yaml", run="synthetic_updown", data=SYNTHETIC, split="test"),
    RowSpec("synthetic-updown-shuffled", "the same model, traits shuffled across test queries",
            config="configs/synthetic_updown.yaml", run="synthetic_updown", data=SYNTHETIC, split="test",
            traits="shuffled"),
    RowSpec("synthetic-updown-no-personality", "UpDown without the personality encoder",
            config="configs/synthetic_updown.yaml", overrides=("model.personality.enabled=false",),
            run="synthetic_updown_nopers", data=SYNTHETIC, split="test"),
    RowSpec("synthetic-showtell", "ShowTell with the trait (configs/synthetic_showtell.yaml), beam 3",
            config="configs/synthetic_showtell.yaml", run="synthetic_showtell", data=SYNTHETIC, split="test"),
    RowSpec("synthetic-showatttell", "Show, Attend and Tell with the trait (configs/synthetic_showatttell.yaml)",
            config="configs/synthetic_showatttell.yaml", run="synthetic_showatttell", data=SYNTHETIC,
            split="test"),
)


@dataclass
class Context:
    """Where runs go, the shared overrides and the JSON rows already scored."""

    runs: Path = RUNS
    adopt_from: Path | None = Path("runs")
    """Also reuse a finished run of the same resolved config in any folder directly under this one (or under
    ``runs``)."""
    epochs: int | None = None
    threads: int = 0
    device: str = "auto"
    indexes: dict[str, Path] = field(default_factory=dict)
    """Retrieval rows: an existing flat index of the whole pool for the row's checkpoint (row name -> INDEX_ROOT)."""
    cached: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ training


def train_overrides(spec: RowSpec, ctx: Context) -> list[str]:
    return list(spec.overrides) + ([f"train.epochs={ctx.epochs}"] if ctx.epochs else [])


def run_folder(spec: RowSpec, ctx: Context) -> Path:
    name = spec.run or spec.name
    return ctx.runs / (f"{name}_e{ctx.epochs}" if ctx.epochs else name)


def resolved_config(spec: RowSpec, ctx: Context):
    from transresnet.config import load_config

    assert spec.config is not None
    return load_config(spec.config, train_overrides(spec, ctx))


def _same_config(folder: Path, wanted: str) -> bool:
    """``folder`` holds a finished run (report.json written after its config.yaml) of config dump ``wanted``."""
    from transresnet.config import dump_config, load_config

    config, report = folder / "config.yaml", folder / "report.json"
    if not (config.is_file() and report.is_file() and (folder / "best").is_dir()):
        return False
    if report.stat().st_mtime < config.stat().st_mtime:  # a run started again over an earlier one
        return False
    try:
        return dump_config(load_config(config)) == wanted
    except Exception:  # noqa: BLE001 - an older run whose config no longer validates is not this one
        return False


def finished_run(spec: RowSpec, ctx: Context) -> Path | None:
    """The row's own run folder, or a run under ``adopt_from`` of the same resolved config, when finished."""
    from transresnet.config import dump_config

    wanted = dump_config(resolved_config(spec, ctx))
    own = run_folder(spec, ctx)
    candidates = [own]
    for root in (ctx.runs, ctx.adopt_from):
        if root is not None and root.is_dir():
            candidates += sorted(p for p in root.iterdir() if p.is_dir() and p not in candidates)
    return next((p for p in candidates if _same_config(p, wanted)), None)


def train_command(spec: RowSpec, ctx: Context, out: Path, *, threads: bool = True) -> list[str]:
    """The ``transresnet train`` command of the row (``threads``: with this invocation's --threads)."""
    sets = [part for o in train_overrides(spec, ctx) for part in ("--set", o)]
    flags = ["--threads", str(ctx.threads)] if ctx.threads and threads else []
    return ["transresnet", "train", "--config", str(spec.config), *sets, "--out", str(out), *flags]


def train_row(spec: RowSpec, ctx: Context) -> Path:
    """Train the row's config (the code path of ``transresnet train``) into its run folder."""
    import torch

    from transresnet.cli.train import check_inputs

    config = resolved_config(spec, ctx)
    check_inputs(config)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    out = run_folder(spec, ctx)
    logger.info("training %s: %s", spec.name, shlex.join(train_command(spec, ctx, out)))
    if config.model.family == "retrieval":
        from transresnet.train import train
    else:
        from transresnet.generation.train import train_generator as train
    train(config, out)
    return out


def training_summary(run: Path) -> dict[str, Any]:
    """Best epoch, epochs run and training time from a finished run's report and metrics."""
    report = json.loads((run / "report.json").read_text())
    epochs = 0
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        epochs = sum(1 for line in lines if "epoch" in line and line.get("phase") is None)
    summary = {"best_epoch": report.get("best_epoch"), "epochs_run": epochs,
               "train_seconds": report.get("train_seconds")}
    if report.get("pretrain"):
        pre = report["pretrain"]
        summary["pretrain"] = {"captions": pre.get("captions"), "excluded_held_out": pre.get("excluded_held_out"),
                               "epochs": len(pre.get("epochs", []))}
    return summary


# ------------------------------------------------------------------------------------------- scoring


def checkpoint_fingerprint(path: Path) -> str:
    meta = json.loads((path / "meta.json").read_text())
    return str(meta.get("fingerprint") or hashlib.sha256((path / "meta.json").read_bytes()).hexdigest())


def row_key(spec: RowSpec, ctx: Context, checkpoint: Path) -> str:
    """What a scored row depends on: config and overrides (resolved), checkpoint, data, split, scoring options."""
    from transresnet.config import dump_config

    parts = {"kind": spec.kind, "checkpoint": checkpoint_fingerprint(checkpoint), "data": spec.data,
             "split": spec.split, "beam_size": spec.beam_size, "traits": spec.traits}
    if spec.config is not None:
        parts["config"] = dump_config(resolved_config(spec, ctx))
    if spec.kind == "retrieval":
        parts["pool"] = spec.pool
        if spec.name in ctx.indexes:
            parts["index"] = str(ctx.indexes[spec.name])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def eval_options(spec: RowSpec, checkpoint: Path, out: Path, device: str):
    from transresnet.options import EvalOptions

    return EvalOptions(checkpoint=checkpoint, data=Path(spec.data), protocol="generate", split=spec.split,
                       out=out, beam_size=spec.beam_size, traits=spec.traits, device=device)


def eval_folder(spec: RowSpec, ctx: Context) -> Path:
    """The row's eval report (and the retrieval rows' pool and index), beside the table's runs."""
    return ctx.runs / "eval" / spec.name.replace("@e", "_e")


def score_generator(spec: RowSpec, checkpoint: Path, ctx: Context) -> tuple[dict[str, Any], list[str]]:
    """``transresnet eval --protocol generate`` of the checkpoint: its report and the command."""
    from transresnet.generation.evaluate import run_generate_eval
    from transresnet.options import to_flags

    options = eval_options(spec, checkpoint, eval_folder(spec, ctx), ctx.device)
    command = ["transresnet", "eval", *to_flags(options, always=("protocol",))]
    logger.info("scoring %s: %s", spec.name, shlex.join(command))
    return run_generate_eval(options), command


def pool_without(pool: str, excluded_images: set[str], out: Path) -> tuple[Path, dict[str, int]]:
    """The caption pool as a CSV (caption, image) without any caption of ``excluded_images`` (by file name)."""
    kept = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with open(pool, newline="") as src, open(partial, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["caption", "image"])
        for row in csv.DictReader(src):
            if Path(row["image"]).name in excluded_images:
                dropped += 1
                continue
            writer.writerow([row["caption"], row["image"]])
            kept += 1
    os.replace(partial, out)
    return out, {"pool_rows": kept + dropped, "excluded_rows": dropped, "pool_rows_kept": kept}


def pool_index(checkpoint, pool_csv: Path, root: Path):
    """The flat (exact) index of ``pool_csv`` for ``checkpoint``: loaded when built before, else built (the
    captions encoded in the build's ``auto`` precision: reduced only within its bound of float32)."""
    from transresnet.index import BuildOptions, build_index, load_index

    with contextlib.suppress(Exception):  # none yet, or built for another checkpoint or pool
        index = load_index(root, checkpoint=checkpoint)
        if index.manifest.get("source", {}).get("path") == str(pool_csv):
            return index
    build_index(checkpoint, pool_csv, root, BuildOptions(index_type="flat", precision="auto"))
    return load_index(root, checkpoint=checkpoint)


def top1_outside(index, vectors, excluded_images: set[str], pool: str) -> list[str]:
    """Each query's best caption whose photo is not one of ``excluded_images``: an index built without them
    answers with its top-1; an index of the whole pool is searched deep enough to pass all of their captions."""
    if "image" not in index.manifest.get("columns", []):
        return [found[0].caption for found in index.search(vectors, 1)]
    with open(pool, newline="") as handle:
        inside = sum(1 for row in csv.DictReader(handle) if Path(row["image"]).name in excluded_images)
    hits = index.search(vectors, min(inside + 1, len(index)))
    return [next(h.caption for h in found if Path(str(h.metadata.get("image"))).name not in excluded_images)
            for found in hits]


def score_retrieval(spec: RowSpec, checkpoint_dir: Path, ctx: Context) -> tuple[dict[str, Any], list[str]]:
    """Top-1 caption of the pool (the split's photos' captions left out) for each query, scored as captions.

    The pool is ``spec.pool`` without those captions, indexed flat (exact) for the checkpoint; or, given
    ``ctx.indexes[spec.name]``, an existing flat index of the whole pool whose hits of those photos are
    skipped (the same ranking, without encoding the pool again).
    """
    from transresnet.index import load_index

    from transresnet.checkpoint import load_checkpoint
    from transresnet.data import load_dataset
    from transresnet.devices import resolve_device
    from transresnet.evaluate import image_features, load_records, query_vectors, trait_slots
    from transresnet.generation.data import group_queries
    from transresnet.generation.evaluate import score_queries

    options = eval_options(spec, checkpoint_dir, eval_folder(spec, ctx), ctx.device)
    checkpoint = load_checkpoint(checkpoint_dir, device=resolve_device(ctx.device))
    queries = group_queries(load_records(options))
    excluded = {q.image_path.name for q in queries}
    work = eval_folder(spec, ctx)
    given = ctx.indexes.get(spec.name)
    if given is not None:
        index, pool_counts = load_index(given, checkpoint=checkpoint), {}
        how = (f"# = the flat index {given} of {spec.pool} (built for this checkpoint), hits of the "
               f"{spec.split} photos skipped, each {spec.split} photo's top-1")
    else:
        pool_csv, pool_counts = pool_without(spec.pool, excluded, work / "pool.csv")
        index = pool_index(checkpoint, pool_csv, work / "index")
        how = (f"# = transresnet index build --checkpoint {checkpoint_dir} --captions {pool_csv} --out "
               f"{work / 'index'} --type flat, then each {spec.split} photo's top-1")
    started = time.perf_counter()
    paths = list(dict.fromkeys(q.image_path for q in queries))
    features = image_features(checkpoint, paths, feature_cache=None, batch_size=64)
    row = {p: i for i, p in enumerate(paths)}
    slots = trait_slots(checkpoint, [q.trait for q in queries], spec.traits, 0)
    vectors = query_vectors(checkpoint, features[[row[q.image_path] for q in queries]], slots, 64)
    captions = top1_outside(index, vectors, excluded, spec.pool)
    train = load_dataset(FLICKR, split="train").records if Path(FLICKR).is_file() else []
    metrics = score_queries(queries, captions, training_captions=[r.caption for r in train],
                            meteor=shutil.which("java") is not None)
    report = {**metrics, **pool_counts, "pool_captions_indexed": len(index), "index": str(index.path),
              "index_precision": index.manifest.get("encoding", {}).get("precision"),
              "search_s": round(time.perf_counter() - started, 2),
              "examples": [{"image": q.image_id, "caption": c, "references": list(q.references[:2])}
                           for q, c in list(zip(queries, captions, strict=True))[:10]]}
    work.mkdir(parents=True, exist_ok=True)
    (work / "eval.json").write_text(json.dumps(report, indent=1))
    extra = ["--index-for", f"{spec.name}={given}"] if given is not None else []
    return report, ["python", "benchmarks/generate_table.py", "--only", spec.name, *extra, how]


# ---------------------------------------------------------------------------------------------- rows


def checkpoint_for(spec: RowSpec, ctx: Context, *, train: bool) -> tuple[Path | None, list[str] | None, Path | None]:
    """(best checkpoint, training command, run folder), training first when ``train`` and none is finished
    (a finished run's command is the config and overrides that reproduce it, without thread flags)."""
    if spec.checkpoint is not None:
        return Path(spec.checkpoint), None, None
    run = finished_run(spec, ctx)
    trained_here = run is None
    if run is None:
        if not train:
            return None, None, None
        run = train_row(spec, ctx)
    return run / "best", train_command(spec, ctx, run, threads=trained_here), run


def run_row(spec: RowSpec, ctx: Context) -> dict[str, Any]:
    """One scored row: from the cache when its key is there, else trained (if needed) and scored."""
    checkpoint, _, _ = checkpoint_for(spec, ctx, train=False)
    if checkpoint is not None:
        key = row_key(spec, ctx, checkpoint)
        cached = ctx.cached.get(spec.name)
        if cached is not None and cached.get("key") == key:
            logger.info("%s: cached (key %s)", spec.name, key)
            return {**cached, "cached": True}
    started = time.perf_counter()
    checkpoint, train_cmd, run = checkpoint_for(spec, ctx, train=True)
    assert checkpoint is not None
    score = score_retrieval if spec.kind == "retrieval" else score_generator
    report, eval_cmd = score(spec, checkpoint, ctx)
    row: dict[str, Any] = {
        "name": spec.name, "what": spec.what, "kind": spec.kind, "key": row_key(spec, ctx, checkpoint),
        "config": spec.config, "overrides": train_overrides(spec, ctx) if spec.config else [],
        "checkpoint": str(checkpoint), "data": spec.data, "split": spec.split, "traits": spec.traits,
        "beam_size": spec.beam_size, "decoding": report.get("decoding"),
        "metrics": {k: report[k] for k in METRICS if report.get(k) is not None},
        "commands": [shlex.join(train_cmd)] if train_cmd else [],
        "note": spec.note, "seconds": round(time.perf_counter() - started, 1), "cached": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    row["commands"].append(shlex.join(eval_cmd[:-1]) + " " + eval_cmd[-1] if eval_cmd[-1].startswith("#")
                           else shlex.join(eval_cmd))
    if run is not None:
        row["training"] = training_summary(run)
        row["run"] = str(run)
    for extra in ("pool_rows", "excluded_rows", "pool_captions_indexed", "index", "index_precision"):
        if extra in report:
            row[extra] = report[extra]
    row["examples"] = report.get("examples", [])[:5]
    return row


# ------------------------------------------------------------------------------------------ JSON, table


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Several invocations (different --only rows) may write the one JSON: one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"generate_table-{digest}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    return {row["name"]: row for row in json.loads(path.read_text()).get("rows", [])}


def save_row(path: Path, row: dict[str, Any], order: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Merge one row into the JSON (re-read under the lock: other invocations may have added rows)."""
    with locked(path):
        rows = read_rows(path)
        rows[row["name"]] = {k: v for k, v in row.items() if k != "cached"}
        ranked = sorted(rows.values(), key=lambda r: (order.index(base_name(r["name"]))
                                                      if base_name(r["name"]) in order else len(order), r["name"]))
        data = {"benchmark": "generate_table", "machine": machine(), "rows": ranked}
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(partial, path)
    return rows


def _fmt(metrics: dict[str, Any], key: str, digits: int = 1) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


HEADER = ("row", "data", "BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "distinct words", "% novel",
          "voice acc", "best epoch / run")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        m, training = row["metrics"], row.get("training") or {}
        trained = (f"{training.get('best_epoch')} / {training.get('epochs_run')}" if training else "-")
        out.append([row["name"], f"{Path(row['data']).parent.name} {row['split']}", _fmt(m, "bleu_1"),
                    _fmt(m, "bleu_4"), _fmt(m, "rouge_l"), _fmt(m, "cider_d"), _fmt(m, "meteor"),
                    _fmt(m, "distinct_words", 0), _fmt(m, "novel_pct"), _fmt(m, "voice_accuracy"), trained])
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def select(names: Sequence[str] | None, specs: Sequence[RowSpec] = ROWS) -> list[RowSpec]:
    if not names:
        return [s for s in specs if s.config is None or Path(s.config).is_file()]
    known = {s.name: s for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(known)}")
    return [known[n] for n in names]


def budgeted(specs: Sequence[RowSpec], epochs: int) -> list[RowSpec]:
    """``--epochs N``: the trained rows as rows of their own, ``NAME@eN`` (a full-budget row keeps its name)."""
    return [replace(s, name=f"{s.name}@e{epochs}", what=f"{s.what} ({epochs} epochs at most)")
            if s.config else s for s in specs]


def base_name(name: str) -> str:
    return name.split("@e")[0]


def run_rows(specs: Sequence[RowSpec], ctx: Context, json_path: Path,
             order: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Score each row (cached ones from the JSON), merging each into ``json_path`` as it finishes."""
    order = list(order or [s.name for s in specs])
    ctx.cached = read_rows(json_path)
    rows = dict(ctx.cached)
    for spec in specs:
        row = run_row(spec, ctx)
        rows = save_row(json_path, row, order) if not row["cached"] else rows
        rows[spec.name] = row
        m = row["metrics"]
        logger.info("%s: BLEU-4 %s CIDEr-D %s%s", spec.name, _fmt(m, "bleu_4"), _fmt(m, "cider_d"),
                    " (cached)" if row["cached"] else "")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ROW", help=f"rows to run: {', '.join(s.name for s in ROWS)}")
    parser.add_argument("--epochs", type=int, help="override train.epochs of every trained row (its own run folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--runs", type=Path, default=RUNS, help="run folders (default: runs/generate_table)")
    parser.add_argument("--out", type=Path, default=JSON_PATH, help="JSON of the rows")
    parser.add_argument("--index-for", action="append", default=[], metavar="ROW=INDEX_ROOT",
                        help="a retrieval row: search this existing flat index of the whole pool (built for the "
                             "row's checkpoint), skipping the val photos' captions, instead of building one")
    parser.add_argument("--show", action="store_true", help="print the table of the JSON's rows; run nothing")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--no-adopt", action="store_true", help="do not reuse finished runs elsewhere in runs/")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_env()
    os.chdir(REPO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.show:
        rows = read_rows(args.out)
        ordered = sorted(rows.values(), key=lambda r: ([s.name for s in ROWS] + [base_name(r["name"])]).index(
            base_name(r["name"])))
        print(markdown_table(ordered) if args.markdown else table(table_rows(ordered), HEADER))
        return 0
    specs = select(args.only)
    if args.epochs is not None:
        specs = budgeted(specs, args.epochs)
    ctx = Context(runs=args.runs, adopt_from=None if args.no_adopt else Path("runs"), epochs=args.epochs,
                  threads=args.threads, device=args.device,
                  indexes={row: Path(path) for row, _, path in (item.partition("=") for item in args.index_for)})
    rows = run_rows(specs, ctx, args.out, order=[s.name for s in ROWS])
    ordered = list(read_rows(args.out).values())
    print(markdown_table(ordered) if args.markdown else table(table_rows(ordered), HEADER))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
