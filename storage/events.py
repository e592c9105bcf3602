"""Platform events already handled, so an event the platform delivers twice is answered once."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import bindparam, delete, text
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ProcessedEvent, UTCDateTime, utcnow

# Plain SQL that SQLite and PostgreSQL both speak. The dialects' insert().on_conflict_do_nothing()
# builds the same statement but is never cached (SQLAlchemy compiles it anew each time), and
# this runs for every message.
_MARK = text(
    "INSERT INTO processed_events (platform, event_id, created_at) VALUES (:platform, :event_id, :created_at) "
    "ON CONFLICT (platform, event_id) DO NOTHING RETURNING event_id"
).bindparams(bindparam("created_at", type_=UTCDateTime()))


async def mark_event_processed(session: AsyncSession, *, platform: str, event_id: str) -> bool:
    """Record an event id: True the first time, False for a duplicate. The caller commits.

    Race-safe: of concurrent sessions marking one event, exactly one gets True (on
    PostgreSQL the others wait for it to commit, then see the conflict).
    """
    inserted = await session.scalar(_MARK, {"platform": platform, "event_id": event_id, "created_at": utcnow()})
    return inserted is not None


async def prune_processed_events(session: AsyncSession, *, older_than: dt.datetime) -> int:
    """Forget event ids recorded before `older_than` (platforms stop retrying long before); returns how many."""
    result = await session.execute(
        delete(ProcessedEvent)
        .where(ProcessedEvent.created_at < older_than)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
