"""Streaming a reply into Discord: posted early, edited at most once per interval, split at 2,000 characters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import discord

from bot.discord_format import LIMIT, split_message

# Neither the model nor a user can make the bot ping anyone: no @everyone, roles, users or reply pings.
NO_MENTIONS = discord.AllowedMentions.none()
# Discord refuses empty messages; a reply with no text at all still gets one.
EMPTY_REPLY = "(no answer)"

# Posts one new message (in a channel, or as an interaction follow-up) and returns it, for later edits.
Send = Callable[..., Awaitable[discord.Message | discord.WebhookMessage]]


@dataclass
class _Message:
    message: discord.Message | discord.WebhookMessage
    shown: str
    written: float  # event-loop time of the last post or edit


class MessageStream:
    """One reply written into one or more Discord messages as its pieces arrive.

    The first message is posted with the first text. After that each message is
    edited at most once per `interval` seconds (Discord allows about five edits per
    five seconds in a channel); text that arrives in between goes into the next edit.
    When the text outgrows Discord's limit the message is finished and the reply goes
    on in a new one. The last edit of each message is always made, after waiting out
    the interval, so the messages end up holding the whole reply.
    """

    def __init__(self, send: Send, *, interval: float = 1.0, limit: int = LIMIT) -> None:
        self.send = send
        self.interval = interval
        self.limit = limit
        self.text = ""
        self.messages: list[_Message] = []

    async def write(self, pieces: AsyncIterator[str], **extras: Any) -> None:
        """Post and edit until the reply ends; extras (a file, buttons) go with the last message."""
        if extras:  # they are sent with a message, so the text is posted once it is whole
            async for piece in pieces:
                self.text += piece
        else:
            async for piece in pieces:
                self.text += piece
                await self._show(final=False)
        await self._show(final=True, extras=extras)
        if not self.messages:
            await self._post(EMPTY_REPLY, extras)

    async def _show(self, *, final: bool, extras: dict[str, Any] | None = None) -> None:
        parts = split_message(self.text, self.limit)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if i == len(self.messages):
                await self._post(part, extras if final and last and extras else {})
                continue
            message = self.messages[i]
            if message.shown == part:
                continue
            if final or not last:  # this message's text will not change again: the edit must be made
                await asyncio.sleep(max(0.0, message.written + self.interval - _now()))
                await self._edit(message, part)
            elif _now() - message.written >= self.interval:
                await self._edit(message, part)

    async def _post(self, text: str, extras: dict[str, Any]) -> None:
        message = await self.send(text, allowed_mentions=NO_MENTIONS, **extras)
        self.messages.append(_Message(message, shown=text, written=_now()))

    async def _edit(self, message: _Message, text: str) -> None:
        await message.message.edit(content=text, allowed_mentions=NO_MENTIONS)
        message.shown, message.written = text, _now()


def _now() -> float:
    return asyncio.get_running_loop().time()
