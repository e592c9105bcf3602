"""Neutral message types that every adapter speaks, and the adapter contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True)
class Incoming:
    """One message from a person on any platform, already translated by its adapter."""

    platform: str  # "console", "discord", "slack"
    user_id: str  # the platform's id for the account
    display_name: str
    text: str
    channel_id: str = ""
    workspace_id: str = ""  # Discord guild or Slack team; "" where the platform has none
    thread_id: str = ""
    is_dm: bool = True
    addressed: bool = True  # the bot was mentioned, DM'd or commanded
    event_id: str = ""  # the platform's id for the event, to drop retries

    @property
    def place(self) -> str:
        """The key of the place a conversation lives in: a DM, a channel or a thread."""
        if self.is_dm:
            return f"{self.platform}:dm"
        return ":".join([self.platform, self.workspace_id, self.channel_id, self.thread_id]).rstrip(":")


class ErrorKind(str, Enum):
    """Why a reply is not a normal answer, so an adapter can show it differently."""

    INVALID = "invalid"  # the user sent something we cannot use
    BUSY = "busy"
    FAILED = "failed"  # generation failed
    REFUSED = "refused"  # banned, not allowed here, or over quota
    DUPLICATE = "duplicate"  # a platform retry of an event already answered: show nothing
    UNAVAILABLE = "unavailable"  # the database is unreachable or the bot is shutting down: try again shortly


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes


@dataclass
class Reply:
    """The answer to one Incoming: text pieces that arrive as they are generated."""

    pieces: AsyncIterator[str]
    ephemeral: bool = False  # only the asker should see it
    error: ErrorKind | None = None
    attachment: Attachment | None = None  # e.g. the JSON of /export
    confirm_command: str | None = None  # the command text a "confirm" button should send, e.g. "/forget confirm"

    @classmethod
    def text(
        cls,
        text: str,
        *,
        ephemeral: bool = False,
        error: ErrorKind | None = None,
        attachment: Attachment | None = None,
        confirm_command: str | None = None,
    ) -> Reply:
        """A reply whose whole text is known up front (command answers, errors)."""

        async def one() -> AsyncIterator[str]:
            yield text

        return cls(
            pieces=one(), ephemeral=ephemeral, error=error, attachment=attachment, confirm_command=confirm_command
        )

    async def collect(self) -> str:
        """The whole text, for callers that do not stream."""
        return "".join([piece async for piece in self.pieces])


class Adapter(Protocol):
    """A platform connection: it turns platform events into Incoming and shows Replies."""

    name: str

    async def run(self) -> None:
        """Serve until the platform connection ends or the task is cancelled."""

    async def connected(self) -> bool:
        """Whether messages can arrive now: the platform connection is up (for /readyz)."""
