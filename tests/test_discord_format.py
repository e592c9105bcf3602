"""Splitting long replies into Discord messages: within the limit, in order, at the best boundary."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_format import LIMIT, split_message


PROSE = ["word", "a", ". ", "! ", "? ", " ", "\n", "\n\n", "x" * 60]


def texts(pieces: list[str]) -> st.SearchStrategy[str]:
    """Texts of 200 to 1,200 pieces: most are longer than one message."""
    return st.lists(st.sampled_from(pieces), min_size=200, max_size=1200).map("".join)


@settings(max_examples=40)
@given(texts(PROSE))
def test_parts_fit_and_keep_all_the_text_in_order(text: str) -> None:
    parts = split_message(text)
    assert all(0 < len(p) <= LIMIT for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split()), "only whitespace at the cuts is dropped"


@settings(max_examples=40)
@given(texts([*PROSE, "\n```\n", "\n```py\n"]))
def test_code_blocks_stay_closed_in_every_part(text: str) -> None:
    parts = split_message(text)
    assert all(0 < len(p) <= LIMIT for p in parts)
    assert all(p.count("```") % 2 == 0 for p in parts[:-1]), "a part that ends inside a block closes it"


def test_paragraphs_beat_sentences_and_sentences_beat_words() -> None:
    paragraph = "This is one sentence. " * 40 + "The end.\n\n"  # 890 characters
    parts = split_message(paragraph * 3)
    assert [p.endswith("The end.") for p in parts] == [True, True]

    sentences = "This is one sentence with some words. " * 80
    assert all(p.endswith("words.") for p in split_message(sentences))


def test_a_code_block_is_closed_and_reopened_at_a_line() -> None:
    code = "```python\n" + "".join(f"print({i})  # a line of code\n" for i in range(100)) + "```"
    first, second = split_message("Here is the program:\n" + code)
    assert first.startswith("Here is the program:\n```python\n") and first.endswith(")  # a line of code\n```")
    assert second.startswith("```python\nprint(") and second.endswith("```")
    assert first.count("```") == 2 and second.count("```") == 2


def test_a_cut_depends_only_on_the_text_before_the_limit() -> None:
    """While a reply streams, its finished messages keep their text."""
    text = "Some words in a sentence. " * 200
    grown = [split_message(text[:n]) for n in range(2100, 5200, 300)]
    assert all(parts[0] == grown[0][0] for parts in grown)


def test_short_and_empty_text() -> None:
    assert split_message("  hello  ") == ["hello"]
    assert split_message(" \n ") == []
    assert split_message("x" * 4500) == ["x" * 1996, "x" * 1996, "x" * 508]
