"""Dialogue corpora: readers for each file format, a held-out split, and training token streams.

Every reader returns conversations in one neutral form, ``Conversation = list[str]``:
the turns of a two-speaker dialogue in order, alternating speakers. Consecutive
messages from one speaker are joined into one turn with "\\n".

Formats ``load_corpus`` recognises:

- ``*.jsonl``, our format for users' own data. One conversation per line, either
  ``{"turns": ["hi", "hello! how are you?", "fine, thanks"]}`` or just the list
  ``["hi", "hello! how are you?", "fine, thanks"]``. Turns alternate between two
  speakers, the first one being the user; blank lines are skipped.
- ``*.json`` / ``*.json.gz`` holding the chitchat-dataset (BYU CCC) object
  ``{id: {"messages": [[{"text", "sender"}, ...], ...]}}``; one-party
  conversations are dropped.
- ``*.json`` / ``*.json.gz`` holding Topical-Chat ``{id: {"content": [{"message", "agent"}, ...]}}``.
- ``*.csv`` from Synthetic-Persona-Chat, column ``Best Generated Conversation`` with
  ``User 1:`` / ``User 2:`` lines; bracketed placeholders such as ``[User 1's name]``
  are removed.
- A folder: every recognised file directly inside it, in name order.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.tokenizer import ChatTokenizer

Conversation = list[str]

FORMATS = (
    "*.jsonl ({'turns': [...]} or a JSON list of strings per line)",
    "*.json/*.json.gz (chitchat-dataset or Topical-Chat)",
    "*.csv (Synthetic-Persona-Chat)",
    "a folder of such files",
)
IGNORE_INDEX = -100  # target id the loss skips


class CorpusError(ValueError):
    """A corpus file that cannot be read; the message names the file (and line)."""


def load_corpus(path: Path) -> list[Conversation]:
    """Read a dialogue file or a folder of them, choosing the reader by file name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _reader_for(p) is not None)
        if not files:
            raise CorpusError(f"{path}: no dialogue files in this folder; accepted: {'; '.join(FORMATS)}")
        return [conv for file in files for conv in load_corpus(file)]
    if not path.is_file():
        raise CorpusError(f"{path}: no such file or folder")
    reader = _reader_for(path)
    if reader is None:
        raise CorpusError(f"{path}: unknown dialogue format; accepted: {'; '.join(FORMATS)}")
    return reader(path)


def _reader_for(path: Path) -> Callable[[Path], list[Conversation]] | None:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return read_jsonl
    if name.endswith((".json", ".json.gz")):
        return read_json
    if name.endswith(".csv"):
        return read_persona_chat
    return None


def read_jsonl(path: Path) -> list[Conversation]:
    """Our own format: one conversation per line, {"turns": [...]} or a list of strings."""
    convs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    convs.append(_jsonl_turns(json.loads(line)))
            except ValueError as e:  # also json.JSONDecodeError and UnicodeDecodeError
                raise CorpusError(f"{path}, line {number}: {e}") from None
    return convs


def _jsonl_turns(record: Any) -> Conversation:
    turns = record.get("turns") if isinstance(record, dict) else record
    if not isinstance(turns, list) or not turns:
        raise ValueError('expected {"turns": ["...", ...]} or a non-empty list of strings')
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, str) or not tidy(turn):
            raise ValueError(f"turn {i} is not a non-empty string: {turn!r}")
    return [tidy(turn) for turn in turns]


def read_json(path: Path) -> list[Conversation]:
    """chitchat-dataset or Topical-Chat, told apart by the fields of the first conversation."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: not readable JSON ({e})") from None
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    if not isinstance(first, dict) or not {"messages", "content"} & first.keys():
        raise CorpusError(
            f"{path}: JSON is neither chitchat-dataset ({{id: {{'messages': ...}}}}) "
            f"nor Topical-Chat ({{id: {{'content': ...}}}}); for your own data use .jsonl"
        )
    convert = chitchat_conversations if "messages" in first else topical_chat_conversations
    try:
        return convert(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise CorpusError(f"{path}: unexpected structure for {convert.__name__} ({e!r})") from None


def chitchat_conversations(data: dict[str, Any]) -> list[Conversation]:
    """BYU CCC: each turn is a list of messages from one sender; keep two-party conversations."""
    convs = []
    for conv in data.values():
        messages = [m for turn in conv["messages"] for m in turn]
        if len({m["sender"] for m in messages}) != 2:
            continue  # a single turn of someone waiting for a partner
        convs.append(merge_turns((m["sender"], m["text"]) for m in messages))
    return [c for c in convs if len(c) >= 2]


def topical_chat_conversations(data: dict[str, Any]) -> list[Conversation]:
    """Topical-Chat: agent_1/agent_2 messages, consecutive ones of one agent merged."""
    convs = [merge_turns((m["agent"], m["message"]) for m in conv["content"]) for conv in data.values()]
    return [c for c in convs if len(c) >= 2]


_SPEAKER = re.compile(r"^[\s*]*User ([12])[\s*]*:[\s*]*(.*)$")
_PLACEHOLDER = re.compile(r"\[[^\[\]]*(?:\]|$)")  # an unclosed "[..." runs to the line end


def read_persona_chat(path: Path) -> list[Conversation]:
    """Synthetic-Persona-Chat CSV: lines after a "User N:" line continue that turn."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{path}: not a readable CSV ({e})") from None
    if not rows or "Best Generated Conversation" not in rows[0]:
        raise CorpusError(f"{path}: expected a Synthetic-Persona-Chat CSV with a 'Best Generated Conversation' column")
    convs = [merge_turns(_persona_chat_lines(row["Best Generated Conversation"] or "")) for row in rows]
    return [c for c in convs if len(c) >= 2]


def _persona_chat_lines(text: str) -> Iterator[tuple[str, str]]:
    speaker = None  # lines before the first "User N:" are stage directions; drop them
    for line in text.split("\n"):
        match = _SPEAKER.match(line)
        if match:
            speaker, line = match.group(1), match.group(2)
            if line.endswith("*"):  # "*User 1:* hi *" markdown decoration
                line = line.rstrip(" *")
        if speaker is not None and re.search(r"\w", line):  # skip "* * *" separators
            yield speaker, remove_placeholders(line)


def remove_placeholders(text: str) -> str:
    """Drop every "[...]" span ("[User 1's name]", "[name]", stage directions) from one line and tidy the gap."""
    text = _PLACEHOLDER.sub(" ", text)
    text = re.sub(r"[ \t]+([,.!?;:])", r"\1", text)  # "Hi [name]!" -> "Hi !" -> "Hi!"
    text = re.sub(r",([.!?])", r"\1", text)  # "thanks, [name]." -> "thanks,." -> "thanks."
    text = re.sub(r"^[\s,;:]+", "", text)  # "[name], how are you?" -> "how are you?"
    return tidy(text)


def tidy(text: str) -> str:
    """Collapse runs of spaces, strip every line and drop empty lines."""
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def merge_turns(messages: Iterable[tuple[Any, str]]) -> Conversation:
    """(speaker, text) messages -> turns: empty texts dropped, one speaker's run joined with "\\n"."""
    turns: Conversation = []
    last = object()
    for speaker, text in messages:
        text = tidy(text)
        if not text:
            continue
        if speaker == last:
            turns[-1] += "\n" + text
        else:
            turns.append(text)
            last = speaker
    return turns


def split_by_conversation(
    convs: Sequence[Conversation], val_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Held-out split decided by a hash of each conversation's text and the seed.

    A conversation's side never depends on the others, so adding a corpus does not
    reshuffle the rest, and duplicates land on the same side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for conv in convs:
        digest = hashlib.blake2b("\x1e".join(conv).encode(), digest_size=8, salt=seed.to_bytes(8, "little"))
        u = int.from_bytes(digest.digest(), "little") / 2**64
        (val if u < val_fraction else train).append(conv)
    return train, val


def conversation_ids(tokenizer: ChatTokenizer, turns: Conversation) -> list[int]:
    """Token ids of the marked turns; the first speaker is the user, then bot and user alternate."""
    return [t for i, text in enumerate(turns) for t in tokenizer.turn("user" if i % 2 == 0 else "bot", text)]


def encode_conversation(tokenizer: ChatTokenizer, turns: Conversation) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets for one conversation on its own, both sides as targets.

    The targets are every token of the conversation; the inputs are the targets shifted
    right behind eos_id, which is what precedes a conversation in the packed training
    stream. So no token goes unscored, for our tokenizer and the GPT-2 one alike.
    """
    ids = conversation_ids(tokenizer, turns)
    return [tokenizer.eos_id, *ids[:-1]], ids


class TokenStream:
    """Conversations packed end to end into one flat array; batches are random windows of it."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32))

    @classmethod
    def from_conversations(cls, tokenizer: ChatTokenizer, convs: Iterable[Conversation]) -> TokenStream:
        ids = [t for conv in convs for t in conversation_ids(tokenizer, conv)]
        return cls(np.array(ids, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (batch_size, block_size) int64; targets are inputs shifted by one."""
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"only {len(self.tokens)} tokens of data, a window needs {block_size + 1}")
        starts = torch.randint(0, len(self.tokens) - block_size, (batch_size, 1), generator=generator)
        window = self.tokens[starts + torch.arange(block_size + 1)].long()  # (B, T+1)
        return window[:, :-1], window[:, 1:]
