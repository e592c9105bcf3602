"""Prompt building: persona and recent turns as marked tokens, fitted to the model's window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.tokenizer import ChatTokenizer

CUT_MARKER = "[…] "


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "bot"
    text: str


def _cut_to(tokenizer: ChatTokenizer, role: str, text: str, budget: int) -> list[int]:
    """The turn's ids with the text's start dropped (and marked) until it fits in budget tokens."""
    ids = tokenizer.turn(role, text)
    if len(ids) <= budget:
        return ids
    overhead = len(tokenizer.turn(role, CUT_MARKER))
    body = tokenizer.encode(text)
    keep = max(budget - overhead, 0)
    # Decoding a token suffix can start mid-character; the tokenizer's round-trip drops the broken bytes.
    tail = tokenizer.decode(body[len(body) - keep :]) if keep else ""
    ids = tokenizer.turn(role, CUT_MARKER + tail)
    while len(ids) > budget and tail:  # re-encoding the tail may merge differently; trim until it fits
        tail = tail[1:]
        ids = tokenizer.turn(role, CUT_MARKER + tail)
    return ids[:budget]


def build_prompt(
    tokenizer: ChatTokenizer,
    *,
    persona: str,
    history: Sequence[Turn],
    message: str,
    context_size: int,
    reply_budget: int,
) -> list[int]:
    """Token ids for the model: persona, as many recent turns as fit (newest first), the message, the bot's cue.

    The window holds context_size tokens and the reply needs reply_budget of them;
    the new message always goes in, cut at its start if it alone is too long.
    """
    prefix = tokenizer.reply_prefix()
    available = max(context_size - reply_budget - len(prefix), 1)
    system = _cut_to(tokenizer, "system", persona, available // 4) if persona else []
    available -= len(system)
    current = _cut_to(tokenizer, "user", message, available)
    available -= len(current)
    kept: list[list[int]] = []
    for turn in reversed(history):
        ids = tokenizer.turn(turn.role, turn.text)
        if len(ids) > available:
            break
        kept.append(ids)
        available -= len(ids)
    return system + [t for ids in reversed(kept) for t in ids] + current + prefix
