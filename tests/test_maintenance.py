"""Retention and housekeeping through the running bot's pruning job."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from bot.maintenance import prune_forever, prune_once
from storage.events import mark_event_processed
from storage.models import Message, ProcessedEvent, utcnow
from storage.repository import add_message, get_active_conversation, get_or_create_user


async def seed(sessions: async_sessionmaker[AsyncSession], now: dt.datetime) -> None:
    async with sessions() as session, session.begin():
        user = await get_or_create_user(session, platform="console", workspace_id="", platform_user_id="me", display_name="me")
        conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console:dm", is_dm=True)
        for age_days, text in ((100, "ancient"), (8, "last week"), (0, "today")):
            message = await add_message(session, conversation_id=conversation.id, role="user", text=text, token_count=1)
            message.created_at = now - dt.timedelta(days=age_days)
        await mark_event_processed(session, platform="slack", event_id="old")
        await mark_event_processed(session, platform="slack", event_id="new")
        (await session.get_one(ProcessedEvent, ("slack", "old"))).created_at = now - dt.timedelta(days=3)


async def texts(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sessions() as session:
        return list(await session.scalars(select(Message.text).order_by(Message.id)))


async def test_retention_deletes_only_messages_past_the_setting(db_url: str, session_factory: async_sessionmaker[AsyncSession]) -> None:
    now = utcnow()
    await seed(session_factory, now)
    keep_all = Settings(_env_file=None, database_url=db_url, history_retention_days=0)
    pruned = await prune_once(keep_all, session_factory, now)
    assert (pruned.messages, pruned.events) == (0, 1), "event ids are forgotten after two days in any case"
    assert await texts(session_factory) == ["ancient", "last week", "today"]
    week = Settings(_env_file=None, database_url=db_url, history_retention_days=7)
    pruned = await prune_once(week, session_factory, now)
    assert (pruned.messages, pruned.events) == (2, 0)
    assert await texts(session_factory) == ["today"]


async def test_the_job_runs_in_the_background_until_cancelled(db_url: str, session_factory: async_sessionmaker[AsyncSession]) -> None:
    await seed(session_factory, utcnow())
    settings = Settings(_env_file=None, database_url=db_url, history_retention_days=30)
    job = asyncio.create_task(prune_forever(settings, session_factory, every=0.01))
    for _ in range(200):
        if await texts(session_factory) == ["last week", "today"]:
            break
        await asyncio.sleep(0.01)
    job.cancel()
    assert await texts(session_factory) == ["last week", "today"]
