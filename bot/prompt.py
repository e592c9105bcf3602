"""Prompts: our Jinja2 template or the model's own chat template, rendered to token ids, with the history
fitted to the model's window."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from model.chat_template import ChatTemplate
from model.tokenizer import ChatTokenizer

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "chat.j2"
CUT_MARKER = "[…] "

# Private-use characters stand for the markers while the template renders; they are
# removed from every value first, so only the template itself can place a marker.
MARKERS = {"system": "\ue000", "user": "\ue001", "bot": "\ue002", "end": "\ue003"}
_ROLE_OF = {char: role for role, char in MARKERS.items()}
_SPLIT = re.compile("([" + "".join(MARKERS.values()) + "])")
_NO_MARKERS = str.maketrans("", "", "".join(MARKERS.values()))


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "bot"
    text: str
    id: int | None = None  # the stored message's id, where there is one


class PromptTemplate:
    """A prompt template file; rendering gives token ids, not text, so markers stay markers."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or DEFAULT_TEMPLATE
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(path.parent),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        self.path = path
        self._template = env.get_template(path.name)
        # Render once now, so a mistake in the template stops start-up instead of every reply.
        self._template.render(**MARKERS, persona="p", user_name="u", turns=[Turn("user", "t")], message="m")

    def render(
        self, tokenizer: ChatTokenizer, *, persona: str, user_name: str, turns: Sequence[Turn], message: str
    ) -> list[int]:
        clean = lambda text: text.translate(_NO_MARKERS)  # noqa: E731
        text = self._template.render(
            **MARKERS,
            persona=clean(persona),
            user_name=clean(user_name),
            turns=[Turn(t.role, clean(t.text)) for t in turns],
            message=clean(message),
        )
        ids: list[int] = []
        for part in _SPLIT.split(text):
            if part in _ROLE_OF:
                role = _ROLE_OF[part]
                ids += [tokenizer.eos_id] if role == "end" else tokenizer.role_marker(role)
            elif part.strip():
                ids += tokenizer.encode(part)
        return ids

    def turn_cost(self, tokenizer: ChatTokenizer, turn: Turn) -> int:
        """Tokens a turn takes in the prompt, as the default template spends them."""
        return len(tokenizer.turn(turn.role, turn.text))


class ChatPrompt:
    """An instruct model's own chat template: the conversation as chat messages, rendered by the template.

    The persona and the user's name make the system message; the turns and the new message
    follow as user and assistant messages. For templates that insist on alternating roles
    (Llama 2's, Mistral's), adjacent turns of one role become one message and the turns start
    with a user message.
    """

    def __init__(self, template: ChatTemplate, tokenizer: ChatTokenizer) -> None:
        self.template = template
        # Render now, so a template that fails for our messages stops start-up instead of every reply;
        # and learn what a turn costs beyond its text (the template's markers around it).
        one = self.render(tokenizer, persona="p", user_name="u", turns=[], message="m")
        turns = [Turn("user", "a"), Turn("bot", "b")]
        three = self.render(tokenizer, persona="p", user_name="u", turns=turns, message="m")
        texts = len(tokenizer.encode("a")) + len(tokenizer.encode("b"))
        self._turn_markers = max(0, -(-(len(three) - len(one) - texts) // 2))  # per turn, rounded up

    @classmethod
    def for_tokenizer(cls, tokenizer: ChatTokenizer) -> ChatPrompt:
        """The prompt of a tokenizer that has a chat template."""
        return cls(ChatTemplate.for_tokenizer(tokenizer), tokenizer)

    def messages(self, *, persona: str, user_name: str, turns: Sequence[Turn], message: str) -> list[dict[str, str]]:
        """The chat messages: system, then the turns from the first user turn on, then the new message."""
        about_user = f"You are talking with {user_name}." if user_name else ""
        system = " ".join(part for part in (persona.strip(), about_user) if part)
        messages = [{"role": "system", "content": system}] if system else []  # else the template's default
        chat: list[dict[str, str]] = []
        for role, text in [*((t.role, t.text) for t in turns), ("user", message)]:
            role = "assistant" if role == "bot" else "user"
            if chat and chat[-1]["role"] == role:
                chat[-1]["content"] += "\n\n" + text
            elif chat or role == "user":
                chat.append({"role": role, "content": text})
        return messages + chat

    def render(
        self, tokenizer: ChatTokenizer, *, persona: str, user_name: str, turns: Sequence[Turn], message: str
    ) -> list[int]:
        """Token ids of the messages, as the chat template places them, ending with the assistant's cue."""
        chat = self.messages(persona=persona, user_name=user_name, turns=turns, message=message)
        return self.template.encode(tokenizer, chat, add_generation_prompt=True)

    def turn_cost(self, tokenizer: ChatTokenizer, turn: Turn) -> int:
        """Tokens a turn takes in the prompt: its text and the template's markers around it."""
        return len(tokenizer.encode(turn.text)) + self._turn_markers


def cut_start(tokenizer: ChatTokenizer, text: str, max_tokens: int) -> str:
    """Text shortened to about max_tokens tokens by dropping its start, visibly marked."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text
    keep = ids[len(ids) - max(max_tokens, 0) :] if max_tokens > 0 else []
    # a token boundary can fall inside a character; the broken bytes decode to U+FFFD
    return CUT_MARKER + tokenizer.decode(keep).lstrip("\ufffd")


def cut_end(tokenizer: ChatTokenizer, text: str, max_tokens: int) -> str:
    """Text shortened to about max_tokens tokens by dropping its end, visibly marked."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[: max(max_tokens, 0)]).rstrip("\ufffd") + " […]"


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    first: int  # index in the history of the oldest turn kept (len(history) when none)
    # the chat messages that produced ids (ChatPrompt), for an engine that renders them itself
    messages: list[dict[str, str]] | None = None


def build_prompt(
    template: PromptTemplate | ChatPrompt,
    tokenizer: ChatTokenizer,
    *,
    persona: str,
    user_name: str,
    history: Sequence[Turn],
    message: str,
    context_size: int,
    reply_budget: int,
    keep_from: int | None = None,
) -> FittedPrompt:
    """Token ids for the model: recent turns (as many as fit, newest first) around the new message.

    The window holds context_size tokens and the reply needs reply_budget of them (at
    most half the window). The persona gets at most a quarter of the rest; the new
    message always goes in, cut at its start with a visible marker if it alone is too long.

    keep_from is the previous prompt's `first` in this conversation: while the turns from
    there on still fit, the prompt starts with them again, so it extends the previous one
    and the engine reuses its cached keys and values instead of recomputing the whole
    window at every turn. When they no longer fit, old turns are dropped down to half the
    room, which leaves space for the next several turns to extend the prompt again.
    """
    # A reply longer than half the window still leaves the prompt half of it; generation slides the window.
    budget = context_size - min(reply_budget, context_size // 2)
    persona = cut_end(tokenizer, persona, budget // 4)

    def render(turns: Sequence[Turn], text: str) -> list[int]:
        return template.render(tokenizer, persona=persona, user_name=user_name, turns=turns, message=text)

    ids = render([], message)
    keep = len(tokenizer.encode(message))
    while len(ids) > budget and keep > 0:  # re-encoding a cut text can merge differently: repeat until it fits
        keep -= len(ids) - budget
        message = cut_start(tokenizer, message, keep)
        ids = render([], message)

    room = budget - len(ids)
    costs = [template.turn_cost(tokenizer, t) for t in history]
    first = _oldest_fitting(costs, room)
    if keep_from is not None and first > keep_from:  # the previous start no longer fits: drop a chunk
        first = _oldest_fitting(costs, room // 2)
    elif keep_from is not None:
        first = keep_from
    ids = render(history[first:], message)
    while len(ids) > budget and first < len(history):  # a template that spends more per turn: drop the oldest
        first += 1
        ids = render(history[first:], message)
    if isinstance(template, ChatPrompt):
        chat = template.messages(persona=persona, user_name=user_name, turns=history[first:], message=message)
        return FittedPrompt(ids, first, chat)
    return FittedPrompt(ids, first)


def _oldest_fitting(costs: Sequence[int], room: int) -> int:
    """The index of the oldest turn such that it and every later one fit in room."""
    first = len(costs)
    while first > 0 and costs[first - 1] <= room:
        first -= 1
        room -= costs[first]
    return first
