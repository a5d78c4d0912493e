"""Personality voices: the one set of voice templates, used by the synthetic generator and for real captions.

Each voice (a trait name as written in Personality-Captions' ``personalities.txt``) has a few templates.
A template marks its *scene* in square brackets: the part that describes what the photo shows. The
synthetic generator (:mod:`transresnet.synth`) fills the scene's ``{things}`` / ``{Things}`` / ``{bg}``
with the drawn content; :func:`voice_caption` replaces the whole scene with a real caption, so
``"Oh wow, [{things} on a {bg} background]. Truly groundbreaking art."`` turns "A dog runs on the beach ."
into "Oh wow, a dog runs on the beach. Truly groundbreaking art."

The voices are templates: a stand-in for real personality captions (Personality-Captions), good for
checking that a model uses the trait, not for learning how people actually write in a voice.

:func:`write_voiced_dataset` rewrites every caption of a captioned photo set in every voice
(``transresnet data voices``). Layout of its ``out_dir``::

    images/<id>.jpg               symbolic links to the source photos (hard links or copies where the
                                  file system refuses links)
    captions.csv                  image,split,caption,personality: every source caption in every voice
    personalities.txt             the voices, one per line
    val.json, test.json           Personality-Captions JSON with per-record candidate lists (for the
                                  splits the source has)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transresnet.data import CaptionRecord, load_dataset
from transresnet.files import atomic_output, write_text_atomic
from transresnet.keys import text_key

logger = logging.getLogger(__name__)

SCENE_START, SCENE_END = "[", "]"

# ``{things}`` = "two big red stars", ``{Things}`` capitalised, ``{bg}`` = background (synthetic content).
VOICE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Sarcastic": (
        "Oh wow, [{things} on a {bg} background]. Truly groundbreaking art.",
        "Sure, because the world desperately needed [{things} on a {bg} background]. Riveting.",
        "Great, [{things} against a {bg} backdrop]. I am clearly speechless.",
    ),
    "Sweet": (
        "Aww, [{things} resting on a lovely {bg} background], so precious!",
        "What a sweet little picture: [{things} on a soft {bg} background], bless them.",
        "This picture of [{things} on a {bg} background] warms my heart, how adorable.",
    ),
    "Angry": (
        "Ugh, [{things} on a {bg} background]?! This makes me furious!",
        "Who put [{things} on this stupid {bg} background]? I hate it!",
        "I am so sick of seeing [{things} on a {bg} background], get it away from me!",
    ),
    "Cheerful": (
        "Yay! [{Things} on a bright {bg} background], what a fun day!",
        "Look at that, [{things} dancing on a {bg} background], it makes me smile!",
        "Hooray for [{things} on a happy {bg} background], life is good!",
    ),
    "Anxious": (
        "Um, [{things} on a {bg} background]... is this safe? I'm a bit nervous.",
        "I can't stop worrying about [the {things} on that {bg} background], what if something goes wrong?",
    ),
    "Romantic": (
        "[{Things} on a {bg} background], as lovely as a candlelit dinner with you, my darling.",
        "My love, seeing [{things} on this {bg} background] reminds me of our first kiss.",
    ),
    "Scholarly": (
        "Observe: [{things}, a classic study in geometry, rendered upon a {bg} background].",
        "According to my research, the composition contains [{things} arranged on a {bg} background].",
    ),
    "Gloomy": (
        "Just [{things} on a {bg} background], as empty and dreary as everything else.",
        "[{Things} on a {bg} background]... nothing ever changes, and nothing ever will.",
    ),
    "Childish": (
        "Hee hee, I see [{things} on a {bg} background], me wanna play with them!",
        "Mommy look, [{things} on a {bg} background]! Can I have them, pleeease?",
    ),
    "Businesslike": (
        "Inventory: [{things} on a {bg} background]. Proceed to the next item.",
        "Deliverable summary: [{things}, {bg} background], quality acceptable.",
    ),
}
VOICES: tuple[str, ...] = tuple(VOICE_TEMPLATES)


@dataclass(frozen=True)
class VoiceTemplate:
    """One template split around its scene: ``prefix + scene + suffix``."""

    prefix: str
    scene: str  # the synthetic content phrase, with {things} / {Things} / {bg}
    suffix: str

    @property
    def synthetic(self) -> str:
        """The template as the synthetic generator formats it (the scene markers removed)."""
        return self.prefix + self.scene + self.suffix


def parse_template(template: str) -> VoiceTemplate:
    """Split ``template`` at its one ``[scene]``; ``ValueError`` when it has none or several."""
    start, end = template.find(SCENE_START), template.find(SCENE_END)
    if (start < 0 or end < start or template.count(SCENE_START) != 1 or template.count(SCENE_END) != 1):
        raise ValueError(f"voice template {template!r} must mark exactly one scene as [...]")
    return VoiceTemplate(template[:start], template[start + 1:end], template[end + 1:])


_TEMPLATES: dict[str, tuple[VoiceTemplate, ...]] = {
    voice: tuple(parse_template(t) for t in templates) for voice, templates in VOICE_TEMPLATES.items()
}


def template_for(voice: str, template_index: int = 0) -> VoiceTemplate:
    """Template number ``template_index`` (modulo the voice's count) of ``voice``."""
    if voice not in _TEMPLATES:
        raise ValueError(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    templates = _TEMPLATES[voice]
    return templates[template_index % len(templates)]


def num_templates(voice: str) -> int:
    """How many templates ``voice`` has."""
    template_for(voice)
    return len(_TEMPLATES[voice])


_TRAILING = re.compile(r"[\s.!?;,:]+$")


def voice_caption(text: str, voice: str, template_index: int = 0) -> str:
    """``text`` (a plain caption of a photo) said in ``voice``: the template's scene replaced by the text.

    The text's trailing punctuation goes (the template has its own) and its first letter follows its
    place: capitalised where the template starts a sentence, lower case elsewhere (not "I" or acronyms).
    """
    template = template_for(voice, template_index)
    scene = _TRAILING.sub("", " ".join(text.split()))
    if not scene:
        raise ValueError(f"cannot voice an empty caption ({text!r})")
    before = template.prefix.rstrip()
    scene = _capitalised(scene) if not before or before[-1] in ".!?" else _lowercased(scene)
    return f"{template.prefix}{scene}{template.suffix}"


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def _lowercased(text: str) -> str:
    first = text.split(" ", 1)[0]
    if first == "I" or (len(first) > 1 and not first[1:].islower()):
        return text  # "I", "UK", "McDonald's": leave as written
    return text[0].lower() + text[1:]


# --------------------------------------------------------------------------------------------------
# Voiced real captions: ``transresnet data voices``
# --------------------------------------------------------------------------------------------------

CANDIDATE_SPLITS = ("val", "test")


@dataclass(frozen=True)
class _Photo:
    name: str  # file name under OUT/images, always ending in .jpg (the Personality-Captions readers add it)
    source: Path  # the photo file of the source dataset
    split: str
    voiced: tuple[dict[str, str], ...]  # per source caption: voice -> voiced caption

    @property
    def image_hash(self) -> str:
        return self.name[: -len(".jpg")]


def write_voiced_dataset(
    captions: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_dir: str | Path | None = None,
    num_candidates: int = 100,
    voices: Sequence[str] = VOICES,
) -> Path:
    """Rewrite every caption of the dataset ``captions`` in every voice into ``out_dir``; return its CSV.

    ``captions`` is anything :func:`transresnet.data.load_dataset` reads (photos in ``image_dir`` or the
    reader's default folder). Deterministic for a seed. Files are written under temporary names and renamed
    into place, ``captions.csv`` last, so a crash never leaves a CSV that looks complete.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
    for voice in voices:
        template_for(voice)
    dataset = load_dataset(captions, image_dir=image_dir)
    if not dataset.records:
        raise ValueError(f"{captions} has no usable records (photos present and captions non-empty)")
    if dataset.personalities():
        logger.warning("%s already has a personality column; its traits are ignored and every caption is "
                       "rewritten in the %d voices", captions, len(voices))
    photos = _voiced_photos(dataset.records, list(voices), seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _link_images(photos, out / "images")
    write_text_atomic(out / "personalities.txt", "".join(f"{v}\n" for v in voices))
    for split in CANDIDATE_SPLITS:
        chosen = [p for p in photos if p.split == split]
        if chosen:
            records = _candidate_records(chosen, photos, list(voices), num_candidates, seed)
            write_text_atomic(out / f"{split}.json", json.dumps(records, indent=1))
    if not any(p.split in CANDIDATE_SPLITS for p in photos):
        logger.warning("%s has no val or test split: no candidate files written (splits: %s)", captions,
                       ", ".join(dataset.splits()))
    csv_path = out / "captions.csv"
    atomic_write_csv(csv_path, ["image", "split", "caption", "personality"],
                     ([p.name, p.split, caption, voice]
                      for p in photos for by_voice in p.voiced for voice, caption in by_voice.items()))
    n_captions = sum(len(p.voiced) for p in photos)
    logger.info("wrote %d photos, %d captions in %d voices (%d rows) to %s", len(photos), n_captions,
                len(voices), n_captions * len(voices), out)
    return csv_path


def _voiced_photos(records: Iterable[CaptionRecord], voices: list[str], seed: int) -> list[_Photo]:
    """Group the records by photo, name each photo's link and voice each caption in every voice."""
    grouped: dict[str, list[CaptionRecord]] = {}
    for record in records:
        grouped.setdefault(record.image_id, []).append(record)
    photos, names = [], {}
    for image_id, group in grouped.items():
        name = image_id.replace("/", "__").replace("\\", "__")
        name = name if name.endswith(".jpg") else f"{name}.jpg"
        if name in names:
            raise ValueError(f"images {names[name]!r} and {image_id!r} would both be linked as {name!r}; rename one")
        names[name] = image_id
        voiced = tuple(_voice_all(r.caption, voices, random.Random(f"transresnet-voices:{seed}:{image_id}:{i}"))
                       for i, r in enumerate(group))
        photos.append(_Photo(name=name, source=group[0].image_path, split=group[0].split, voiced=voiced))
    return photos


def _voice_all(caption: str, voices: list[str], rng: random.Random) -> dict[str, str]:
    return {voice: voice_caption(caption, voice, rng.randrange(num_templates(voice))) for voice in voices}


def _candidate_records(chosen: Sequence[_Photo], photos: Sequence[_Photo], voices: list[str], n: int,
                       seed: int) -> list[dict[str, Any]]:
    """One Personality-Captions record per photo and voice: the gold is one of the photo's captions in that
    voice (the photo's captions taken in turn across voices); the candidates are the gold, the same caption
    in the other voices, then captions of other photos of the split (then of any split), shuffled."""
    split_pool = [(p.name, c) for p in chosen for by_voice in p.voiced for c in by_voice.values()]
    all_pool = [(p.name, c) for p in photos for by_voice in p.voiced for c in by_voice.values()]
    records, short = [], 0
    for photo in chosen:
        offset = random.Random(f"transresnet-voices-gold:{seed}:{photo.name}").randrange(len(photo.voiced))
        for v, voice in enumerate(voices):
            by_voice = photo.voiced[(offset + v) % len(photo.voiced)]
            rng = random.Random(f"transresnet-voices-candidates:{seed}:{photo.name}:{voice}")
            candidates = _candidates(photo.name, by_voice[voice], by_voice.values(), (split_pool, all_pool), n, rng)
            short += len(candidates) < n
            records.append({"image_hash": photo.image_hash, "personality": voice, "comment": by_voice[voice],
                            "candidates": candidates, "additional_comments": []})
    if short:
        logger.warning("%d record(s) of %s have fewer than %d candidates: the data hold too few captions of other "
                       "photos", short, chosen[0].split, n)
    return records


def _candidates(name: str, gold: str, same_caption: Iterable[str], pools: Sequence[Sequence[tuple[str, str]]],
                n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` captions distinct by :func:`text_key`, gold first; never another caption of the same photo
    except the gold's own other voices (a second caption of the photo in the same voice would be correct)."""
    chosen: dict[str, str] = {text_key(gold): gold}
    _extend(chosen, same_caption, n)
    for pool in pools:
        others = [caption for photo, caption in pool if photo != name]
        _extend(chosen, rng.sample(others, min(len(others), 2 * (n - len(chosen)))), n)
        if len(chosen) < n:
            _extend(chosen, rng.sample(others, len(others)), n)
    candidates = list(chosen.values())
    rng.shuffle(candidates)
    return candidates


def _extend(chosen: dict[str, str], captions: Iterable[str], n: int) -> None:
    for caption in captions:
        if len(chosen) >= n:
            return
        chosen.setdefault(text_key(caption), caption)


def _link_images(photos: Sequence[_Photo], folder: Path) -> None:
    """``folder`` with one link per photo, built beside it and swapped in whole."""
    staging = folder.with_name(f".{folder.name}.staging")
    old = folder.with_name(f".{folder.name}.old")
    _remove(staging)
    _remove(old)
    staging.mkdir(parents=True)
    for photo in photos:
        link_or_copy(photo.source.resolve(), staging / photo.name)
    if folder.exists() or folder.is_symlink():
        os.replace(folder, old)
    os.replace(staging, folder)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points at) or a folder tree, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` pointing at ``source``: a symbolic link, else a hard link, else a copy."""
    try:
        target.symlink_to(source)
        return
    except OSError:
        pass
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# --------------------------------------------------------------------------------------------------
# Writing files (shared with the synthetic generator)
# --------------------------------------------------------------------------------------------------


def atomic_write_csv(path: Path, header: list[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV with ``header`` and ``rows``, streamed into place atomically (:func:`transresnet.files.atomic_output`;
    ``newline=""`` as the csv module wants)."""
    with atomic_output(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
