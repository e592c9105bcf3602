"""Processed platform events: a redelivered event is recognised, also when deliveries race."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.events import mark_event_processed, prune_processed_events
from storage.models import ProcessedEvent, utcnow


async def test_first_time_true_then_false(session: AsyncSession) -> None:
    assert await mark_event_processed(session, platform="slack", event_id="Ev1") is True
    assert await mark_event_processed(session, platform="slack", event_id="Ev1") is False
    # The same id on another platform is another event.
    assert await mark_event_processed(session, platform="discord", event_id="Ev1") is True
    await session.commit()
    assert await mark_event_processed(session, platform="slack", event_id="Ev1") is False


async def test_racing_deliveries_are_processed_once(session_factory: async_sessionmaker[AsyncSession]) -> None:
    deliveries = 10
    barrier = asyncio.Barrier(deliveries)

    async def deliver() -> bool:
        async with session_factory() as session:
            await barrier.wait()
            first = await mark_event_processed(session, platform="slack", event_id="Ev-race")
            await session.commit()
            return first

    assert sorted(await asyncio.gather(*(deliver() for _ in range(deliveries)))) == [False] * 9 + [True]


async def test_old_event_ids_are_pruned(session: AsyncSession) -> None:
    now = utcnow()
    session.add(ProcessedEvent(platform="slack", event_id="old", created_at=now - dt.timedelta(days=2)))
    await mark_event_processed(session, platform="slack", event_id="new")
    await session.commit()

    assert await prune_processed_events(session, older_than=now - dt.timedelta(days=1)) == 1
    await session.commit()
    assert await session.scalar(select(func.count()).select_from(ProcessedEvent)) == 1
    assert await mark_event_processed(session, platform="slack", event_id="old") is True
