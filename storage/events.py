"""Platform events already handled, so an event the platform delivers twice is answered once."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ProcessedEvent
from storage.repository import dialect_insert


async def mark_event_processed(session: AsyncSession, *, platform: str, event_id: str) -> bool:
    """Record an event id: True the first time, False for a duplicate. The caller commits.

    Race-safe: of concurrent sessions marking one event, exactly one gets True (on
    PostgreSQL the others wait for it to commit, then see the conflict).
    """
    inserted = await session.scalar(
        dialect_insert(session, ProcessedEvent)
        .values(platform=platform, event_id=event_id)
        .on_conflict_do_nothing(index_elements=["platform", "event_id"])
        .returning(ProcessedEvent.event_id)
    )
    return inserted is not None


async def prune_processed_events(session: AsyncSession, *, older_than: dt.datetime) -> int:
    """Forget event ids recorded before `older_than` (platforms stop retrying long before); returns how many."""
    result = await session.execute(
        delete(ProcessedEvent)
        .where(ProcessedEvent.created_at < older_than)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
