"""Tokens used per user and UTC day (for quotas and the user's own view), and totals for admins."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Date, Integer, Select, bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Conversation, Message, Usage, User

# Plain SQL that SQLite and PostgreSQL both speak: the dialects' on_conflict_do_update() is
# compiled anew every time (never cached), and this runs for every reply.
_ADD = (
    text(
        "INSERT INTO usage (user_id, day, tokens) VALUES (:user_id, :day, :tokens) "
        "ON CONFLICT (user_id, day) DO UPDATE SET tokens = usage.tokens + excluded.tokens RETURNING tokens"
    )
    .bindparams(bindparam("day", type_=Date()), bindparam("tokens", type_=Integer()))
    .columns(tokens=Integer())
)


async def add_usage(session: AsyncSession, *, user_id: int, day: dt.date, tokens: int) -> int:
    """Add `tokens` to the user's count for `day` and return the new count. The caller commits.

    One upsert, so concurrent replies for one user never lose an addition.
    """
    if tokens < 0:
        raise ValueError(f"tokens must not be negative; got {tokens}")
    total = await session.scalar(_ADD, {"user_id": user_id, "day": day, "tokens": tokens})
    assert total is not None, "the upsert returns the row it wrote"
    return total


async def usage_for(session: AsyncSession, *, user_id: int, day: dt.date) -> int:
    """Tokens the user used on `day` (0 when none)."""
    tokens = await session.scalar(select(Usage.tokens).where(Usage.user_id == user_id, Usage.day == day))
    return tokens or 0


async def usage_by_day(session: AsyncSession, *, user_id: int, since: dt.date) -> list[tuple[dt.date, int]]:
    """The user's (day, tokens) from `since` on, oldest first; days without use are left out."""
    rows = await session.execute(
        select(Usage.day, Usage.tokens).where(Usage.user_id == user_id, Usage.day >= since).order_by(Usage.day)
    )
    return [(day, tokens) for day, tokens in rows]


@dataclass(frozen=True)
class Stats:
    """What an admin sees with `stats`."""

    users: int
    conversations: int
    messages: int
    tokens_today: int


async def stats(session: AsyncSession, *, today: dt.date) -> Stats:
    """Counts of users, conversations and messages, and the tokens used on `today` by everyone."""

    async def count(query: Select[tuple[int]]) -> int:
        return (await session.scalar(query)) or 0

    return Stats(
        users=await count(select(func.count(User.id))),
        conversations=await count(select(func.count(Conversation.id))),
        messages=await count(select(func.count(Message.id))),
        tokens_today=await count(select(func.sum(Usage.tokens)).where(Usage.day == today)),
    )
