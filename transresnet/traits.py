"""The personality-trait vocabulary: slot 0 is "no personality", then one slot per trait.

Lookup is case-insensitive and accepts the synonyms a traits file lists in parentheses
("Articulate (Well-spoken, Expressive)"). An unknown trait is an error naming the closest traits,
never a silent fall back to slot 0; "no personality" has to be asked for explicitly.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transresnet.keys import text_key

NO_PERSONALITY = 0
NONE_ALIASES = ("none", "no personality", "<none>")
NONE_NAME = "<none>"


class UnknownTraitError(ValueError):
    def __init__(self, trait: str, suggestions: list[str]) -> None:
        self.trait = trait
        self.suggestions = suggestions
        hint = f"; closest: {', '.join(suggestions)}" if suggestions else ""
        super().__init__(f"unknown personality {trait!r}{hint} (use 'none' for no personality)")


def parse_trait_line(line: str) -> tuple[str, list[str]]:
    """'Articulate (Well-spoken, Expressive)' -> ('Articulate', ['Well-spoken', 'Expressive'])."""
    line = line.strip()
    if "(" in line and line.endswith(")"):
        name, _, rest = line.partition("(")
        synonyms = [s.strip() for s in rest[:-1].split(",") if s.strip()]
        return name.strip(), synonyms
    return line, []


@dataclass
class TraitVocab:
    names: list[str]
    """Canonical trait names; slot i + 1 holds names[i]."""
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for slot, name in enumerate(self.names, start=1):
            for alias in [name, *self.synonyms.get(name, [])]:
                # A synonym shared by two traits keeps its first owner; canonical names always win.
                key = text_key(alias)
                if key in self._index and alias != name:
                    continue
                self._index[key] = slot
        if len(set(map(text_key, self.names))) != len(self.names):
            raise ValueError("trait names must be unique (case-insensitively)")

    @classmethod
    def from_file(cls, path: str | Path) -> TraitVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"traits file {path} not found (one trait per line, synonyms in parentheses)")
        names: list[str] = []
        synonyms: dict[str, list[str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, syns = parse_trait_line(line)
            if text_key(name) in map(text_key, names):
                continue
            names.append(name)
            if syns:
                synonyms[name] = syns
        if not names:
            raise ValueError(f"traits file {path} lists no traits")
        return cls(names, synonyms)

    @classmethod
    def from_traits(cls, traits: Iterable[str | None]) -> TraitVocab:
        """The sorted set of traits seen in training data (None and blanks skipped)."""
        seen: dict[str, str] = {}
        for trait in traits:
            if trait and trait.strip() and text_key(trait) not in NONE_ALIASES:
                seen.setdefault(text_key(trait), trait.strip())
        return cls(sorted(seen.values(), key=str.lower))

    def __len__(self) -> int:
        """Number of slots, including slot 0 (no personality)."""
        return len(self.names) + 1

    def lookup(self, trait: str | None) -> int:
        if trait is None or text_key(trait) in NONE_ALIASES:
            return NO_PERSONALITY
        slot = self._index.get(text_key(trait))
        if slot is None:
            raise UnknownTraitError(trait, self.closest(trait))
        return slot

    def lookup_many(self, traits: Sequence[str | None]) -> list[int]:
        return [self.lookup(t) for t in traits]

    def name_of(self, slot: int) -> str:
        return NONE_NAME if slot == NO_PERSONALITY else self.names[slot - 1]

    def closest(self, trait: str, n: int = 3) -> list[str]:
        matches = difflib.get_close_matches(text_key(trait), list(self._index), n=n, cutoff=0.5)
        return list(dict.fromkeys(self.name_of(self._index[m]) for m in matches))

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "synonyms": self.synonyms}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TraitVocab:
        data = json.loads(text)
        return cls(list(data["names"]), dict(data.get("synonyms", {})))
