import pytest

from tests.helpers import shared_path
from transresnet.traits import NO_PERSONALITY, TraitVocab, UnknownTraitError


def test_lookup_is_case_insensitive_and_accepts_synonyms(tmp_path) -> None:
    path = tmp_path / "traits.txt"
    path.write_text("Sarcastic\nArticulate (Well-spoken, Expressive)\n\nSweet\n")
    vocab = TraitVocab.from_file(path)
    assert len(vocab) == 4
    assert vocab.lookup("sarcastic") == vocab.lookup("SARCASTIC  ") == 1
    assert vocab.lookup("well-spoken") == vocab.lookup("Articulate") == 2
    assert vocab.lookup("none") == vocab.lookup(None) == NO_PERSONALITY
    assert vocab.name_of(2) == "Articulate"


def test_unknown_trait_is_an_error_with_suggestions() -> None:
    vocab = TraitVocab(["Sarcastic", "Sweet", "Angry"])
    with pytest.raises(UnknownTraitError) as info:
        vocab.lookup("sarcastik")
    assert info.value.suggestions[0] == "Sarcastic"
    assert "sarcastik" in str(info.value)


def test_json_round_trip_and_from_traits() -> None:
    vocab = TraitVocab.from_traits(["Sweet", None, "angry", "Sweet", ""])
    assert vocab.names == ["angry", "Sweet"]
    again = TraitVocab.from_json(vocab.to_json())
    assert again.names == vocab.names and again.lookup("SWEET") == vocab.lookup("sweet")


@pytest.mark.shared
def test_real_personalities_file() -> None:
    vocab = TraitVocab.from_file(shared_path("data", "personality-captions", "personalities.txt"))
    assert len(vocab) == 216
    assert vocab.name_of(vocab.lookup("Impartial")) == "Objective"
