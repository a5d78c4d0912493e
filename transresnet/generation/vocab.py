"""Caption vocabulary and the one captioning tokenisation (shared by the decoders and the metrics).

Tokenisation is the standard one of captioning evaluation: lower case, punctuation stripped, split on
whitespace. A word-level vocabulary keeps the training words seen at least ``min_count`` times; a
character-level one (the lecture's min-char-rnn) keeps every character of the tokenised text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def tokenize(text: str) -> list[str]:
    """``"A dog, running!"`` -> ``["a", "dog", "running"]``: lower case, punctuation stripped."""
    words = _NOT_WORD.sub(" ", text.lower().replace("\u2019", "'")).split()
    return [w for w in (w.strip("'") for w in words) if w]


def normalize(text: str) -> str:
    """The tokenised text joined by single spaces (what the metrics compare)."""
    return " ".join(tokenize(text))


@dataclass
class Vocabulary:
    tokens: list[str]
    """Index -> token; the first four are <pad>, <bos>, <eos>, <unk>."""
    level: Literal["word", "char"] = "word"
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[:4]) != SPECIALS:
            raise ValueError(f"a caption vocabulary starts with {', '.join(SPECIALS)}")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], *, level: Literal["word", "char"] = "word", min_count: int = 1,
              max_size: int = 10000) -> Vocabulary:
        """Most frequent first (ties alphabetically), so the same captions always give the same ids."""
        counts = Counter(tok for caption in captions for tok in cls.split(normalize(caption), level))
        ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls([*SPECIALS, *ranked[: max(0, max_size - len(SPECIALS))]], level)

    @staticmethod
    def split(text: str, level: str) -> list[str]:
        return list(text) if level == "char" else text.split()

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, caption: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of a caption (no <bos>/<eos>), unknown tokens as <unk>."""
        ids = [self._index.get(t, UNK_ID) for t in self.split(normalize(caption), self.level)]
        return ids[:max_tokens] if max_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, stopping at <eos> and skipping <pad>/<bos>."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.tokens[i])
        return ("" if self.level == "char" else " ").join(out)

    def to_json(self) -> str:
        return json.dumps({"level": self.level, "tokens": self.tokens}, indent=0)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls(list(data["tokens"]), data.get("level", "word"))
