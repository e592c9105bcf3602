"""Streaming a reply into Slack: a first message early, then throttled chat.update calls, split at a length limit."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from slack_sdk.web.async_client import AsyncWebClient

from bot.slack_format import split_message

# Slack refuses empty messages; a reply with no text at all still gets one.
EMPTY_REPLY = "(no answer)"

# Never let Slack turn names into pings, or links the model made up into previews; the text is escaped already.
NO_PINGS = {"link_names": False}
NO_PREVIEWS = {"unfurl_links": False, "unfurl_media": False}


class UpdateBudget:
    """chat.update calls per workspace in the last minute, against Slack's limit for the method (about 50).

    Shared by every reply in the process, since Slack counts per workspace and app.
    """

    def __init__(self, per_minute: int = 50, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._calls: defaultdict[str, deque[float]] = defaultdict(deque)

    def take(self, workspace: str, *, force: bool = False) -> bool:
        """Count one call if there is room, or always with force; False: skip it, a later update carries the text."""
        now = self.clock()
        calls = self._calls[workspace]
        while calls and now - calls[0] >= 60.0:
            calls.popleft()
        if len(calls) >= self.per_minute and not force:
            return False
        calls.append(now)
        return True


@dataclass
class _Message:
    ts: str
    shown: str
    written: float  # monotonic time of the last post or update


class MessageStream:
    """One reply written into one or more messages of a channel or thread as its pieces arrive.

    The first message is posted with the first text. After that a message is edited
    at most once per `interval` and only while the workspace's budget has room; text
    that arrives in between is merged into the next edit. When the text outgrows
    `limit` characters the message is finished and the reply goes on in a new one.
    The last edit of each message is always sent, so the messages end with the whole reply.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        budget: UpdateBudget,
        *,
        workspace: str,
        channel: str,
        thread_ts: str = "",
        interval: float = 1.0,
        limit: int = 3000,
    ) -> None:
        self.client = client
        self.budget = budget
        self.workspace = workspace
        self.channel = channel
        self.thread_ts = thread_ts or None
        self.interval = interval
        self.limit = limit
        self.text = ""
        self.messages: list[_Message] = []

    async def write(self, pieces: AsyncIterator[str]) -> None:
        """Post and edit until the reply ends."""
        async for piece in pieces:
            self.text += piece
            await self._show(final=False)
        await self._show(final=True)
        if not self.messages:
            await self._post(EMPTY_REPLY)

    async def _show(self, *, final: bool) -> None:
        parts = split_message(self.text, self.limit)
        for i, part in enumerate(parts):
            if i == len(self.messages):
                await self._post(part)
                continue
            message = self.messages[i]
            if message.shown == part:
                continue
            if final or i < len(parts) - 1:  # this message's text will not change again: it must be sent
                await asyncio.sleep(max(0.0, message.written + self.interval - time.monotonic()))
                self.budget.take(self.workspace, force=True)
                await self._update(message, part)
            elif time.monotonic() - message.written >= self.interval and self.budget.take(self.workspace):
                await self._update(message, part)

    async def _post(self, text: str) -> None:
        response = await self.client.chat_postMessage(
            channel=self.channel, thread_ts=self.thread_ts, text=text, **NO_PINGS, **NO_PREVIEWS
        )
        self.messages.append(_Message(ts=response["ts"], shown=text, written=time.monotonic()))

    async def _update(self, message: _Message, text: str) -> None:
        await self.client.chat_update(channel=self.channel, ts=message.ts, text=text, **NO_PINGS)
        message.shown, message.written = text, time.monotonic()

