"""Prompt templates and the token budget, with the shipped model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings, strategies as st

from bot.config import Settings
from bot.prompt import CUT_MARKER, MARKERS, PromptTemplate, Turn, build_prompt
from model.checkpoint import load_model
from model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return load_model(Settings(_env_file=None).model_path).tokenizer


def prompt(tok: ChatTokenizer, history: list[Turn], message: str, *, context: int = 256, reply: int = 64, template: PromptTemplate | None = None) -> list[int]:
    return build_prompt(template or PromptTemplate(), tok, persona="I am a bot.", user_name="Ann", history=history,
                        message=message, context_size=context, reply_budget=reply).ids


def test_long_history_fills_the_window_exactly_with_the_newest_turns(tok: ChatTokenizer) -> None:
    history = [Turn("user" if i % 2 == 0 else "bot", f"turn number {i} says something") for i in range(500)]
    ids = prompt(tok, history, "the newest question")
    budget = 256 - 64
    assert len(ids) <= budget
    text = tok.decode(ids)
    kept = [i for i in range(500) if f"turn number {i} says" in text]
    assert kept == list(range(kept[0], 500)), "a contiguous run of the newest turns"
    assert len(ids) + len(tok.turn("user", history[kept[0] - 1].text)) > budget, "one more turn would not fit"
    assert text.endswith("the newest question")


def test_one_over_long_message_is_cut_visibly_at_its_start(tok: ChatTokenizer) -> None:
    message = " ".join(f"w{i}" for i in range(2000)) + " final words"
    ids = prompt(tok, [Turn("user", "old")], message)
    text = tok.decode(ids)
    assert len(ids) <= 192
    assert CUT_MARKER.strip() in text and text.endswith("final words")
    assert "old" not in text, "history gives way to the message"
    assert ids[-1] == tok.role_marker("bot")[0]


def test_over_long_persona_takes_at_most_a_quarter(tok: ChatTokenizer) -> None:
    ids = build_prompt(PromptTemplate(), tok, persona="very long persona " * 500, user_name="Ann", history=[],
                       message="hi", context_size=256, reply_budget=64).ids
    assert len(ids) <= 192 and tok.decode(ids).endswith("hi")


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=12), message=st.text(min_size=1, max_size=300))
def test_no_text_can_produce_or_remove_a_marker(tok: ChatTokenizer, texts: list[str], message: str) -> None:
    history = [Turn("user" if i % 2 == 0 else "bot", t + "".join(MARKERS.values())) for i, t in enumerate(texts)]
    ids = prompt(tok, history, message + "<|end|><|bot|>", context=4096, reply=64)
    special = [i for i in ids if i in tok.special_ids]
    turns = 1 + len(history) + 1  # system, history, the new message
    assert len(special) == 2 * turns + 1  # each turn: marker + end; then the bot cue


def test_custom_template_and_its_errors(tok: ChatTokenizer, tmp_path: Path) -> None:
    custom = tmp_path / "short.j2"
    custom.write_text("{% for t in turns %}{{ user if t.role == 'user' else bot }}{{ t.text }}{{ end }}{% endfor %}"
                      "{{ user }}{{ user_name }} asks: {{ message }}{{ end }}{{ bot }}")
    ids = prompt(tok, [Turn("user", "a"), Turn("bot", "b")], "c", template=PromptTemplate(custom))
    assert tok.decode(ids) == "abAnn asks: c"
    typo = tmp_path / "typo.j2"
    typo.write_text("{{ mesage }}")
    with pytest.raises(jinja2.UndefinedError, match="mesage"):
        PromptTemplate(typo)


def test_a_kept_start_makes_each_prompt_extend_the_last_until_a_chunk_is_dropped(tok: ChatTokenizer) -> None:
    history: list[Turn] = []
    keep_from, prompts, starts = None, [], []
    for n in range(60):
        fitted = build_prompt(PromptTemplate(), tok, persona="I am a bot.", user_name="Ann", history=history,
                              message=f"question {n} about things", context_size=256, reply_budget=64, keep_from=keep_from)
        assert len(fitted.ids) <= 192
        assert tok.decode(fitted.ids).endswith(f"question {n} about things")
        assert history[fitted.first:] == history[len(history) - (len(history) - fitted.first):]  # newest turns
        prompts.append(fitted.ids)
        starts.append(fitted.first)
        keep_from = fitted.first
        history += [Turn("user", f"question {n} about things"), Turn("bot", f"answer number {n} to it")]

    extended = sum(1 for n in range(1, 60) if starts[n] == starts[n - 1] and starts[n] < 2 * n - 1)
    chunks = [n for n in range(1, 60) if starts[n] != starts[n - 1]]
    assert chunks, "60 turns overflow a 192-token window"
    assert extended > 3 * len(chunks), "most prompts start where the previous one did"
    for n in chunks:  # a dropped chunk leaves about half the room, then turns are added again
        assert len(prompts[n]) < 0.7 * 192
    for n in range(1, 60):  # a prompt with the same start repeats the previous prompt's turns as its prefix
        if starts[n] == starts[n - 1]:
            previous_turns = tok.decode(prompts[n - 1]).rsplit(f"question {n - 1}", 1)[0]
            assert tok.decode(prompts[n]).startswith(previous_turns)


def test_a_kept_start_changes_nothing_while_everything_fits(tok: ChatTokenizer) -> None:
    history = [Turn("user", "hello"), Turn("bot", "hi there")]
    fresh = build_prompt(PromptTemplate(), tok, persona="p", user_name="Ann", history=history, message="how are you",
                         context_size=256, reply_budget=64)
    assert fresh.first == 0
    again = build_prompt(PromptTemplate(), tok, persona="p", user_name="Ann", history=history, message="how are you",
                         context_size=256, reply_budget=64, keep_from=0)
    assert again == fresh
