"""Token usage per user and day, and the admins' totals."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.repository import add_message, get_active_conversation, get_or_create_user
from storage.usage import Stats, add_usage, stats, usage_by_day, usage_for

DAY = dt.date(2025, 3, 14)


async def _user(session: AsyncSession, name: str) -> int:
    user = await get_or_create_user(
        session, platform="slack", workspace_id="T1", platform_user_id=name, display_name=name
    )
    await session.commit()
    return user.id


async def test_usage_adds_up_per_day(session: AsyncSession) -> None:
    user_id = await _user(session, "ann")
    assert await usage_for(session, user_id=user_id, day=DAY) == 0
    assert await add_usage(session, user_id=user_id, day=DAY, tokens=40) == 40
    assert await add_usage(session, user_id=user_id, day=DAY, tokens=2) == 42
    await add_usage(session, user_id=user_id, day=DAY - dt.timedelta(days=3), tokens=7)
    await add_usage(session, user_id=user_id, day=DAY - dt.timedelta(days=30), tokens=9)
    await session.commit()

    assert await usage_for(session, user_id=user_id, day=DAY) == 42
    assert await usage_by_day(session, user_id=user_id, since=DAY - dt.timedelta(days=6)) == [
        (DAY - dt.timedelta(days=3), 7),
        (DAY, 42),
    ]


async def test_negative_usage_is_refused(session: AsyncSession) -> None:
    user_id = await _user(session, "ann")
    with pytest.raises(ValueError, match="negative"):
        await add_usage(session, user_id=user_id, day=DAY, tokens=-1)


async def test_concurrent_additions_are_all_counted(session_factory: async_sessionmaker[AsyncSession]) -> None:
    async with session_factory() as session:
        user_id = await _user(session, "ann")
    writers = 10
    barrier = asyncio.Barrier(writers)

    async def add(tokens: int) -> None:
        async with session_factory() as session:
            await barrier.wait()
            await add_usage(session, user_id=user_id, day=DAY, tokens=tokens)
            await session.commit()

    await asyncio.gather(*(add(n) for n in range(1, writers + 1)))
    async with session_factory() as session:
        assert await usage_for(session, user_id=user_id, day=DAY) == sum(range(1, writers + 1))


async def test_stats_count_everything_and_todays_tokens(session: AsyncSession) -> None:
    ann, bob = await _user(session, "ann"), await _user(session, "bob")
    for user_id in (ann, bob):
        conversation = await get_active_conversation(
            session, user_id=user_id, platform="slack", place="slack:dm", is_dm=True
        )
        await add_message(session, conversation_id=conversation.id, role="user", text="hi", token_count=1)
    await add_usage(session, user_id=ann, day=DAY, tokens=10)
    await add_usage(session, user_id=bob, day=DAY, tokens=5)
    await add_usage(session, user_id=bob, day=DAY - dt.timedelta(days=1), tokens=100)
    await session.commit()

    assert await stats(session, today=DAY) == Stats(users=2, conversations=2, messages=2, tokens_today=15)
    assert (await stats(session, today=DAY + dt.timedelta(days=1))).tokens_today == 0
