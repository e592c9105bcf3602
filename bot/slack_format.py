"""Text between Slack and the core: Slack's markup to plain text on the way in, escaped mrkdwn parts on the way out."""

from __future__ import annotations

import re

# Slack's angle-bracket markup: <@U123>, <@U123|ann>, <#C123|general>, <!here>, <!subteam^S1|@team>, <https://x|label>.
_MARKUP = re.compile(r"<([@#!]?)([^<>|]*)(?:\|([^<>]*))?>")


def escape(text: str) -> str:
    """Text that Slack shows exactly as written: no mention, channel ping or link can come out of it.

    Slack's mrkdwn reads only &, < and > as control characters; <!channel>, <!here> and
    <@U123> need the angle brackets, so escaping these three is enough.
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    """The inverse of escape, for text Slack delivers (it escapes &, < and > that people type)."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def from_slack(text: str, bot_user_id: str = "") -> str:
    """What a person wrote, as plain text: the bot's own mention dropped, other markup as Slack shows it."""

    def plain(match: re.Match[str]) -> str:
        sigil, target, label = match.groups()
        if sigil == "@":
            return "" if target == bot_user_id else "@" + (label or target)
        if sigil == "#":
            return "#" + (label or target)
        if sigil == "!":  # <!here>, <!channel>, <!subteam^S1|@team>, <!date^...|fallback>
            return label or "@" + target
        return label or target  # a link: <https://x> or <https://x|label>

    return unescape(_MARKUP.sub(plain, text)).strip()


def split_message(text: str, limit: int) -> list[str]:
    """The escaped, non-empty parts of text, each at most limit characters long.

    Parts break at a line end or a space in the second half of a part where there is
    one. A part's end depends only on the text up to it, so while a reply streams in
    every part but the last stays the same: earlier messages are final.
    """
    parts = []
    rest = text
    while rest:
        cut = _fit(rest, limit)
        if cut < len(rest):
            newline, space = rest.rfind("\n", limit // 2, cut), rest.rfind(" ", limit // 2, cut)
            cut = newline + 1 if newline > 0 else space + 1 if space > 0 else cut
        part = escape(rest[:cut]).strip()
        if part:
            parts.append(part)
        rest = rest[cut:]
    return parts


def _fit(text: str, limit: int) -> int:
    """How many characters of text fit into limit once escaped."""
    size = 0
    for i, char in enumerate(text):
        size += 5 if char == "&" else 4 if char in "<>" else 1
        if size > limit:
            return max(i, 1)  # a part holds at least one character, so splitting always ends
    return len(text)
