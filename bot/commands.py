"""Platform-neutral commands: parsed once here, whatever platform the text came from."""

from __future__ import annotations

from dataclasses import dataclass

HELP_TEXT = """Talk to me in plain text and I answer. Commands:
  /help   this text
  /reset  forget this conversation and start a new one"""


@dataclass(frozen=True)
class Command:
    name: str
    args: str


KNOWN = {"help", "reset"}


def parse_command(text: str) -> Command | None:
    """The command in text ("/reset", "/settings temperature 0.5"), or None for chat text.

    A lone "/" followed by a space or nothing is chat, not a command.
    """
    if not text.startswith("/") or len(text) < 2 or text[1].isspace():
        return None
    name, _, args = text[1:].partition(" ")
    return Command(name=name.lower(), args=args.strip())
