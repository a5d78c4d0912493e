"""The one text normaliser: trait names, trait tags and caption duplicates compare by this key."""

from __future__ import annotations


def text_key(text: str) -> str:
    """Equal up to case and whitespace: ``text_key("  Very  Sweet ") == text_key("very sweet")``."""
    return " ".join(text.split()).casefold()
