"""The training loop: in-batch softmax over (image + trait, caption) pairs, validated every epoch.

Frozen parts are computed once: a frozen backbone's features come from the on-disk feature cache and a
frozen transformer's pooled outputs from an in-memory cache, so an epoch only runs what trains.

Run folder: ``config.yaml``, ``metrics.jsonl``, ``best/`` (a checkpoint, replaced atomically when validation
improves), ``states/epoch-NNNN-<ns>/`` (the newest two complete training states: a checkpoint plus
optimizer, progress and RNG states) and ``LAST``, the pointer to the newest. ``--resume`` continues from the
newest state that verifies and reproduces the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transresnet.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    load_weights,
    publish_dir,
    read_meta,
    save_checkpoint,
    staging_dir,
    verify_checksums,
    write_checkpoint,
)
from transresnet.checkpoint import clean_leftovers as clean_checkpoint_leftovers
from transresnet.config import ExperimentConfig, dump_config
from transresnet.data import CaptionRecord, load_dataset
from transresnet.devices import resolve_device
from transresnet.encode import encode_queries
from transresnet.encoders import tail_output, tail_parameters
from transresnet.evaluate import task_metrics
from transresnet.features import cached_features, weights_identity
from transresnet.files import remove_stale, write_text_atomic
from transresnet.images import ImagePreprocessor
from transresnet.loss import InBatchSoftmaxLoss
from transresnet.model import TransResNet, create_model
from transresnet.progress import progress
from transresnet.retrieval import RankingTask, task_for
from transresnet.runtime import eval_mode
from transresnet.traits import TraitVocab

logger = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_FORMAT = 1
STATES = "states"
LAST_POINTER = "LAST"
KEEP_STATES = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- inputs


class ImageInputs:
    """Maps image rows to backbone features: cached views (frozen) or live forward passes (trained)."""

    def __init__(self, model: TransResNet, config: ExperimentConfig, paths: list[Path], device: torch.device) -> None:
        self.model = model
        self.paths = paths
        self.device = device
        self.frozen = config.model.image.freeze_backbone
        self.tail = config.model.image.train_tail
        self.preprocessor = ImagePreprocessor(config.model.image)
        self.cached: torch.Tensor | None = None
        if self.frozen:
            # With a trained tail the cache holds the frozen front's maps (its weights are the file's).
            features = cached_features(
                model.backbone, config.model.image, paths, root=config.data.feature_cache,
                weights=weights_identity(config.model.image), views=1 + config.data.augment_crops,
                num_workers=config.train.num_workers, device=device, tail=self.tail)
            self.cached = torch.from_numpy(features)

    def features(self, rows: Sequence[int], *, train: bool) -> torch.Tensor:
        if self.cached is not None:
            # Training draws one cached view (centre or a random crop) per example; evaluation uses the centre.
            views = self.cached.shape[1] if train else 1
            view = torch.randint(views, (len(rows),)) if views > 1 else torch.zeros(len(rows), dtype=torch.long)
            features = self.cached[torch.as_tensor(rows), view].to(self.device)
            return tail_output(self.model.backbone, features, self.tail) if self.tail else features
        pixels = torch.stack([self.preprocessor.load(self.paths[r]) for r in rows])
        return self.model.encode_image(pixels.to(self.device), tta="none")  # training never averages views


class TextInputs:
    """Caption vectors: from cached pooled outputs while the text backbone is frozen, else live."""

    def __init__(self, model: TransResNet, batch_size: int = 256) -> None:
        self.model = model
        self.batch_size = batch_size
        self.pooled: dict[str, torch.Tensor] = {}
        self.use_cache = model.config.text.kind == "transformer" and model.config.text.freeze != "never"

    @torch.inference_mode()
    def precompute(self, texts: Sequence[str]) -> None:
        todo = sorted(set(texts) - self.pooled.keys(), key=len)
        if not self.use_cache or not todo:
            return
        start = time.perf_counter()
        with eval_mode(self.model), progress(len(todo), f"caching text features of {len(todo)} captions",
                                             "captions") as bar:  # pooled outputs without dropout
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                for text, row in zip(chunk, self.model.text.pool(chunk).cpu(), strict=True):
                    self.pooled[text] = row.clone()
                bar.update(len(chunk))
        elapsed = time.perf_counter() - start
        logger.info("cached %d caption features in %.1fs (%.0f captions/s)", len(todo), elapsed,
                    len(todo) / max(elapsed, 1e-9))

    def vectors(self, texts: Sequence[str]) -> torch.Tensor:
        if self.use_cache:
            return self.model.encode_pooled_text(torch.stack([self.pooled[t] for t in texts]))
        return self.model.encode_text(texts)


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Example:
    image_row: int
    trait: int
    caption: str
    query_key: int


def build_examples(records: Sequence[CaptionRecord], image_rows: dict[Path, int], traits: TraitVocab,
                   use_traits: bool) -> list[Example]:
    query_keys: dict[tuple[int, int], int] = {}
    examples = []
    for record in records:
        row = image_rows[record.image_path]
        trait = traits.lookup(record.personality) if use_traits else 0
        key = query_keys.setdefault((row, trait), len(query_keys))
        examples.append(Example(row, trait, record.caption, key))
    return examples


def epoch_batches(examples: Sequence[Example], per_image: int, batch_size: int,
                  rng: random.Random) -> Iterator[list[Example]]:
    """Shuffle images, take up to ``per_image`` of each image's examples, cut into batches."""
    by_image: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        by_image[example.image_row].append(example)
    images = list(by_image)
    rng.shuffle(images)
    ordered = [ex for img in images for ex in rng.sample(by_image[img], min(per_image, len(by_image[img])))]
    for start in range(0, len(ordered) - 1, batch_size):
        batch = ordered[start:start + batch_size]
        if len(batch) >= 2:
            yield batch


# ------------------------------------------------------------------------------------------ evaluation


def query_vectors(model: TransResNet, images: ImageInputs, rows: Sequence[int], trait_ids: Sequence[int],
                  batch_size: int = 256) -> np.ndarray:
    """Query vectors through the one encoding path (:func:`transresnet.encode.encode_queries`)."""
    out = [encode_queries(model, trait_ids[start:start + batch_size],
                          features=images.features(rows[start:start + batch_size], train=False))
           for start in range(0, len(rows), batch_size)]
    return np.concatenate(out)


@torch.inference_mode()
def evaluate(model: TransResNet, task: RankingTask, images: ImageInputs, texts: TextInputs,
             image_rows: dict[Path, int], *, trait_mode: str = "given", seed: int = 0) -> dict[str, float]:
    """R@1/5/10 and ranks of a task, scored by the evaluator's :func:`task_metrics`.

    trait_mode: given, shuffled (permuted across queries) or none. Caption vectors come from
    ``texts``: a frozen transformer's pooled outputs are cached, the projection runs on them each time.
    """
    rows = [image_rows[p] for p in task.query_images]
    traits = model.traits.lookup_many(task.query_traits)
    if trait_mode == "shuffled":
        traits = [int(t) for t in np.random.default_rng(seed).permutation(traits)]
    elif trait_mode == "none":
        traits = [0] * len(traits)
    queries = query_vectors(model, images, rows, traits)
    texts.precompute(task.texts)
    with eval_mode(model):
        text_vecs = torch.cat([texts.vectors(task.texts[i:i + 512]).float().cpu()
                               for i in range(0, len(task.texts), 512)])
    return task_metrics(task, queries, text_vecs)


# ----------------------------------------------------------------------------------- optimizer state


def _param_groups(model: TransResNet, config: ExperimentConfig) -> list[dict[str, Any]]:
    transformer = getattr(model.text, "transformer", None)
    text_ids = {id(p) for p in transformer.parameters()} if transformer is not None else set()
    tail = config.model.image.train_tail
    tail_weights = tail_parameters(model.backbone, tail) if tail else []
    tail_ids = {id(p) for p in tail_weights}
    main = [p for p in model.parameters() if id(p) not in text_ids | tail_ids]
    groups = [{"params": main, "lr": config.train.lr}]
    if tail_weights:
        groups.append({"params": tail_weights, "lr": config.train.backbone_lr})
    if transformer is not None:
        groups.append({"params": list(transformer.parameters()), "lr": config.train.text_lr})
    return groups


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states (torch CPU and CUDA as tensors; python and numpy as JSON-able values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_state}


def restore_rng_states(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], np.uint32)}
    np.random.set_state(numpy_state)


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Optimizer and RNG tensors as safetensors, the rest as JSON (no pickle)."""
    opt = optimizer.state_dict()
    tensors = {f"opt.{pid}.{name}": value.contiguous() for pid, slots in opt["state"].items()
               for name, value in slots.items() if isinstance(value, torch.Tensor)}
    rng_tensors, rng = rng_states()
    save_file({**tensors, **rng_tensors}, str(folder / STATE_TENSORS))
    record = {"format": STATE_FORMAT, "param_groups": opt["param_groups"], "progress": progress, "rng": rng}
    (folder / STATE_JSON).write_text(json.dumps(record))


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and the global RNG states; returns the saved progress.

    A state from before STATE_FORMAT 1 (``last/`` without RNG states) restores the optimizer only.
    """
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"training state in {folder} cannot be read ({err}); resume from an older state "
                              "or start again without --resume") from None
    legacy = "format" not in meta
    prefix = "" if legacy else "opt."
    slots: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith(prefix) and not key.startswith("rng."):
            pid, name = key[len(prefix):].split(".", 1)
            slots[int(pid)][name] = value
    optimizer.load_state_dict({"state": dict(slots), "param_groups": meta.pop("param_groups")})
    if legacy:
        logger.warning("%s holds no RNG states (written by an older version): the resumed run continues, but "
                       "not bit for bit as an uninterrupted one would", folder)
        return meta
    restore_rng_states(tensors, meta["rng"])
    return meta["progress"]


# ---------------------------------------------------------------------------------- training states
# OUT/states/epoch-NNNN-<ns>/ holds one complete unit: the model as a checkpoint (weights, config, traits,
# text/) plus the optimizer, progress and RNG states, every file's sha256 in its one meta.json. It is
# written in a staging folder, flushed, renamed into place, and only then named in OUT/LAST (temp file,
# fsync, os.replace), so a kill at any moment leaves the previous complete state resumable.


def states_dir(out_dir: Path) -> Path:
    return out_dir / STATES


def _state_key(path: Path) -> tuple[int, int] | None:
    """(epoch, ns) of a state folder named ``epoch-NNNN-<ns>``, else None."""
    parts = path.name.split("-")
    if len(parts) != 3 or parts[0] != "epoch" or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1]), int(parts[2])


def list_states(out_dir: Path) -> list[Path]:
    """State folders of a run, oldest first (leftovers and other names ignored)."""
    folder = states_dir(out_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and _state_key(p)] if folder.is_dir() else []
    return sorted(found, key=_state_key)


def read_last_pointer(out_dir: Path) -> str | None:
    """The state folder name ``OUT/LAST`` points at, or None when it is absent or not a plain name."""
    pointer = out_dir / LAST_POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not name or "/" in name or "\\" in name or name.startswith(".") or _state_key(Path(name)) is None:
        logger.warning("%s names %r, which is not a state folder of %s; ignoring it", pointer, name,
                       states_dir(out_dir))
        return None
    return name


def verify_state(folder: Path) -> dict[str, Any]:
    """Checks that a state folder is complete and intact (meta entries, checksums); returns its meta."""
    meta = read_meta(folder, required_files=(WEIGHTS, CONFIG, STATE_TENSORS, STATE_JSON))
    verify_checksums(folder, meta)
    return meta


def publish_state(out_dir: Path, write: Callable[[Path], None], epoch: int) -> Path:
    """Write a state with ``write(folder)`` into staging, rename it into ``states/``, then repoint LAST."""
    final = states_dir(out_dir) / f"epoch-{epoch:04d}-{time.time_ns()}"
    staging = staging_dir(final)
    try:
        write(staging)
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_atomic(out_dir / LAST_POINTER, final.name + "\n")
    prune_states(out_dir, KEEP_STATES)
    return final


def prune_states(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` states (never the one LAST names)."""
    current = read_last_pointer(out_dir)
    states = list_states(out_dir)
    doomed = [p for p in states[: max(0, len(states) - keep)] if p.name != current]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def clean_run_leftovers(out_dir: Path) -> None:
    """Repair a half-swapped best/, then remove what dead writers left: staging folders, temp pointers and
    files (every such name ends in ``@host@pid``; other hidden names are left alone)."""
    clean_checkpoint_leftovers(out_dir / "best")
    remove_stale(out_dir, ".")
    remove_stale(states_dir(out_dir), ".")


def find_resume_state(out_dir: Path) -> Path:
    """The newest complete training state of a run; damaged ones are set aside with a warning.

    Raises FileNotFoundError ("nothing to resume") only when the run has no state at all, and a
    CheckpointError naming each problem when states exist but none is usable.
    """
    clean_run_leftovers(out_dir)
    problems = []
    for folder in reversed(list_states(out_dir)):
        try:
            verify_state(folder)
        except CheckpointError as err:
            aside = folder.with_name(f".damaged-{folder.name}")
            logger.warning("training state %s is damaged (%s); moved aside to %s, trying an older one", folder,
                           err, aside.name)
            os.replace(folder, aside)
            problems.append(str(err))
            continue
        pointer = read_last_pointer(out_dir)
        if pointer != folder.name:
            logger.warning("%s named %s, but the newest complete state is %s: repointing it",
                           out_dir / LAST_POINTER, pointer, folder.name)
            write_text_atomic(out_dir / LAST_POINTER, folder.name + "\n")
        return folder
    legacy = out_dir / "last"
    if (legacy / STATE_JSON).is_file() and (legacy / STATE_TENSORS).is_file():
        verify_checksums(legacy, read_meta(legacy))  # an older version's last/: train state not checksummed
        logger.warning("resuming from %s, written by an older version", legacy)
        return legacy
    if problems:
        raise CheckpointError(f"cannot resume in {out_dir}: no training state there is intact ("
                              + "; ".join(problems) + "); start again without --resume")
    raise FileNotFoundError(f"nothing to resume in {out_dir}: it holds no training state ({states_dir(out_dir)} "
                            f"is {'empty' if states_dir(out_dir).is_dir() else 'absent'}); train without --resume")


def start_fresh(out_dir: Path) -> None:
    """A run without --resume replaces an earlier run's states and metrics in ``out_dir``."""
    old = list_states(out_dir)
    if old or (out_dir / "metrics.jsonl").exists():
        logger.warning("%s holds an earlier run (%d training state(s)); starting over without --resume replaces "
                       "them", out_dir, len(old))
    (out_dir / LAST_POINTER).unlink(missing_ok=True)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)


def keep_metrics_through(out_dir: Path, epoch: int) -> None:
    """Drop metrics.jsonl records after ``epoch`` (and a torn last line): the resumed run writes them again."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    text_unfrozen: bool = False


def _score(metrics: dict[str, float]) -> float:
    """Model selection: R@1 first, the mean of R@1/5/10 to break ties."""
    return metrics["R@1"] + 1e-3 * (metrics["R@1"] + metrics["R@5"] + metrics["R@10"]) / 3


def synthesize_if_missing(config: ExperimentConfig) -> None:
    """``data.synthesize``: draw the synthetic dataset into data.train's folder on first use."""
    data = config.data
    if data.synthesize is None or not data.train or Path(data.train).exists():
        return
    from transresnet.synth import generate_synthetic_dataset

    folder = Path(data.train).parent
    logger.info("%s does not exist yet: drawing %d synthetic images into %s (data.synthesize)", data.train,
                data.synthesize, folder)
    written = generate_synthetic_dataset(folder, data.synthesize, seed=0)
    if written.resolve() != Path(data.train).resolve():
        raise ValueError(f"data.synthesize writes {written}, but data.train is {data.train}: point data.train "
                         f"at {written}")


def load_splits(config: ExperimentConfig) -> tuple[list[CaptionRecord], list[CaptionRecord], list[CaptionRecord]]:
    data = config.data
    if not data.train:
        raise ValueError("data.train is not set; point it at a captions CSV, Personality-Captions JSON or "
                         "Karpathy dataset.json (e.g. --set data.train=path/to/captions.csv)")
    synthesize_if_missing(config)
    train = load_dataset(data.train, split=data.train_split, image_dir=data.image_dir).records
    val = load_dataset(data.val or data.train, split=data.val_split, image_dir=data.image_dir).records
    test = load_dataset(data.test, split=data.test_split, image_dir=data.image_dir).records if data.test else []
    if not train or not val:
        raise ValueError(f"need training and validation records; got {len(train)} train and {len(val)} val")
    return train, val, test


def build_traits(config: ExperimentConfig, train: Sequence[CaptionRecord]) -> TraitVocab:
    if config.model.personality.traits_file:
        return TraitVocab.from_file(config.model.personality.traits_file)
    return TraitVocab.from_traits(r.personality for r in train)


class Trainer:
    def __init__(self, config: ExperimentConfig, out_dir: Path) -> None:
        self.config = config
        self.out_dir = out_dir
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)
        self.train_records, val_records, test_records = load_splits(config)
        traits = build_traits(config, self.train_records)
        self.model = create_model(config.model, traits, captions=[r.caption for r in self.train_records])
        self.model.to(self.device)
        all_paths = list(dict.fromkeys(r.image_path for r in (*self.train_records, *val_records, *test_records)))
        self.image_rows = {p: i for i, p in enumerate(all_paths)}
        self.images = ImageInputs(self.model, config, all_paths, self.device)
        self.texts = TextInputs(self.model)
        use_traits = config.model.personality.enabled
        self.examples = build_examples(self.train_records, self.image_rows, traits, use_traits)
        self.val_task = task_for(val_records)
        self.test_task = task_for(test_records) if test_records else None
        self.optimizer = torch.optim.Adam(_param_groups(self.model, config), lr=config.train.lr,
                                          weight_decay=config.train.weight_decay)
        self.loss = InBatchSoftmaxLoss()
        self.pool = _CaptionPool(self.examples) if config.train.hard_negatives else None
        self.progress = _Progress()
        logger.info("train: %d examples over %d images, %d traits; val: %d %s queries on %s", len(self.examples),
                    len({e.image_row for e in self.examples}), len(traits) - 1, len(self.val_task),
                    self.val_task.protocol, self.device)

    # -- text phases ------------------------------------------------------------------------------

    def _set_text_trainable(self, trainable: bool) -> None:
        text = self.model.text
        if hasattr(text, "set_trainable") and self.config.model.text.kind == "transformer":
            text.set_trainable(trainable)
            self.texts.use_cache = not trainable

    def _text_trainable_now(self) -> bool:
        mode = self.config.model.text.freeze
        return mode == "never" or (mode == "until_plateau" and self.progress.text_unfrozen)

    # -- steps ------------------------------------------------------------------------------------

    def _step(self, batch: list[Example]) -> float:
        unique_rows = list(dict.fromkeys(e.image_row for e in batch))
        position = {row: i for i, row in enumerate(unique_rows)}
        use_amp = self.device.type == "cuda" and self.config.train.amp
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            feats = self.images.features(unique_rows, train=True)
            feats = feats[torch.as_tensor([position[e.image_row] for e in batch], device=feats.device)]
            traits = torch.as_tensor([e.trait for e in batch], device=self.device)
            queries = self.model.encode_query(features=feats, trait_ids=traits)
            captions = self.texts.vectors([e.caption for e in batch])
            logits = self.model.logits(queries, captions)
        caption_ids = torch.as_tensor(_ids_of([e.caption for e in batch]), device=self.device)
        query_ids = torch.as_tensor([e.query_key for e in batch], device=self.device)
        extra = None
        if self.pool is not None:
            negatives = self.pool.hardest(self.model, self.texts, queries, batch, self.config.train.hard_negatives)
            extra = self.model.logits(queries, self.texts.vectors(negatives))
        loss = self.loss(logits, caption_ids, query_ids, extra)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _train_epoch(self) -> float:
        self.model.train()
        # Seeded per epoch, so a resumed run draws the same batches as an uninterrupted one.
        rng = random.Random(self.config.train.seed * 100_003 + self.progress.epoch)
        batches = list(epoch_batches(self.examples, self.config.data.examples_per_image,
                                     self.config.train.batch_size, rng))
        if self.config.train.max_steps_per_epoch:
            batches = batches[: self.config.train.max_steps_per_epoch]
        losses: list[float] = []
        desc = f"epoch {self.progress.epoch + 1} of {self.config.train.epochs}"
        with progress(len(batches), desc, "batches") as bar:
            for batch in batches:
                losses.append(self._step(batch))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
        return float(np.mean(losses)) if losses else float("nan")

    def _validate(self) -> dict[str, float]:
        return evaluate(self.model, self.val_task, self.images, self.texts, self.image_rows)

    # -- persistence ------------------------------------------------------------------------------

    def _save_state(self, metrics: dict[str, Any]) -> Path:
        """Weights, optimizer, progress and RNG states as one unit, published atomically."""
        def write(folder: Path) -> None:
            write_checkpoint(self.model, self.config, folder, metrics=metrics,
                             extra=lambda f: save_train_state(f, self.optimizer, dict(self.progress.__dict__)))

        return publish_state(self.out_dir, write, self.progress.epoch)

    def resume(self) -> None:
        """Continue from the newest complete state: the same weights, optimizer, progress and RNG states."""
        folder = find_resume_state(self.out_dir)
        load_weights(self.model, folder / WEIGHTS, against="the model this config builds (resume with the config "
                                                             "the run started with)")
        state = load_train_state(folder, self.optimizer)
        missing = [k for k in _Progress.__dataclass_fields__ if k not in state]
        if missing:
            raise CheckpointError(f"training state {folder / STATE_JSON} lacks {', '.join(missing)}; "
                                  "start again without --resume")
        self.progress = _Progress(**{k: state[k] for k in _Progress.__dataclass_fields__})
        keep_metrics_through(self.out_dir, self.progress.epoch)
        logger.info("resumed from %s after epoch %d (best R@1 %.2f)", folder, self.progress.epoch,
                    self.progress.best_score)

    # -- driver -----------------------------------------------------------------------------------

    def _log_epoch(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        val = record["val"]
        logger.info("epoch %d: loss %.4f, val R@1 %.2f R@5 %.2f R@10 %.2f (%.1fs)%s", record["epoch"], record["loss"],
                    val["R@1"], val["R@5"], val["R@10"], record["seconds"], " *best*" if record["best"] else "")

    def _after_validation(self, metrics: dict[str, float]) -> bool:
        """Track the best epoch; returns True when training should stop."""
        progress = self.progress
        if _score(metrics) > progress.best_score:
            progress.best_score, progress.best_epoch, progress.bad_epochs = _score(metrics), progress.epoch, 0
            save_checkpoint(self.model, self.config, self.out_dir / "best", metrics={"val": metrics,
                                                                                      "epoch": progress.epoch})
            return False
        progress.bad_epochs += 1
        if progress.bad_epochs < self.config.train.patience:
            return False
        if self.config.model.text.freeze == "until_plateau" and not progress.text_unfrozen:
            logger.info("validation plateaued: unfreezing the text transformer (lr %g)", self.config.train.text_lr)
            progress.text_unfrozen, progress.bad_epochs = True, 0
            return False
        logger.info("early stopping: no validation improvement for %d epochs", progress.bad_epochs)
        return True

    def run(self) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(dump_config(self.config))
        total_start = time.perf_counter()
        self._set_text_trainable(self._text_trainable_now())  # a resumed, unfrozen transformer needs no cache
        self.texts.precompute([e.caption for e in self.examples])
        while self.progress.epoch < self.config.train.epochs:
            self._set_text_trainable(self._text_trainable_now())
            start = time.perf_counter()
            loss = self._train_epoch()
            self.progress.epoch += 1
            metrics = self._validate()
            stop = self._after_validation(metrics)
            record = {"epoch": self.progress.epoch, "loss": loss, "val": metrics,
                      "best": self.progress.best_epoch == self.progress.epoch,
                      "seconds": round(time.perf_counter() - start, 2)}
            self._log_epoch(record)
            self._save_state(record)
            if stop:
                break
        return self._finish(time.perf_counter() - total_start)

    def _finish(self, seconds: float) -> TrainResult:
        best = self.out_dir / "best"
        load_weights(self.model, best / WEIGHTS)
        report: dict[str, Any] = {"best_epoch": self.progress.best_epoch, "train_seconds": round(seconds, 1)}
        for name, task in (("val", self.val_task), ("test", self.test_task)):
            if task is None:
                continue
            report[name] = evaluate(self.model, task, self.images, self.texts, self.image_rows)
            if self.config.model.personality.enabled and any(task.query_traits):
                for mode in ("shuffled", "none"):
                    report[f"{name}_traits_{mode}"] = evaluate(self.model, task, self.images, self.texts,
                                                               self.image_rows, trait_mode=mode,
                                                               seed=self.config.train.seed)
        (self.out_dir / "report.json").write_text(json.dumps(report, indent=1))
        for key, value in report.items():
            if isinstance(value, dict):
                logger.info("%-20s R@1 %6.2f  R@5 %6.2f  R@10 %6.2f  median rank %g (%d queries)", key,
                            value["R@1"], value["R@5"], value["R@10"], value["median_rank"], value["queries"])
        return TrainResult(self.out_dir, best, report)


class _CaptionPool:
    """The distinct training captions, for mining hard negatives (``train.hard_negatives``)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.texts = list(dict.fromkeys(e.caption for e in examples))
        position = {t: i for i, t in enumerate(self.texts)}
        self.gold_of: dict[int, list[int]] = defaultdict(list)  # query key -> its captions' pool rows
        for e in examples:
            self.gold_of[e.query_key].append(position[e.caption])

    @torch.no_grad()
    def _vectors(self, model: TransResNet, texts: TextInputs) -> torch.Tensor:
        if texts.use_cache and all(t in texts.pooled for t in self.texts):  # frozen transformer: cached outputs
            return model.encode_pooled_text(torch.stack([texts.pooled[t] for t in self.texts]))
        return torch.cat([model.encode_text(self.texts[i:i + 512]) for i in range(0, len(self.texts), 512)])

    def hardest(self, model: TransResNet, texts: TextInputs, queries: torch.Tensor, batch: Sequence[Example],
                count: int) -> list[str]:
        """The ``count`` pool captions scoring highest against any query of the batch, golds excluded."""
        scores = (queries.detach().float() @ self._vectors(model, texts).float().T).max(dim=0).values
        gold = [row for key in {e.query_key for e in batch} for row in self.gold_of[key]]
        scores[torch.as_tensor(gold, device=scores.device)] = float("-inf")
        top = scores.topk(min(count, len(self.texts) - len(set(gold)))).indices.tolist()
        return [self.texts[i] for i in top]


def _ids_of(texts: Sequence[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(t, len(ids)) for t in texts]


def train(config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False) -> TrainResult:
    """Train a TransResNet as ``config`` describes; the best checkpoint lands in ``out_dir/best``."""
    out_dir = Path(out_dir)
    trainer = Trainer(config, out_dir)
    if resume:
        trainer.resume()
    else:
        start_fresh(out_dir)
    return trainer.run()
