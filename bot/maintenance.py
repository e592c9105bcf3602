"""Housekeeping while the bot runs: retention of old messages, expired link codes, old event ids."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from storage.events import prune_processed_events
from storage.linking import prune_link_codes
from storage.models import utcnow
from storage.outage import is_outage, outage_reason
from storage.repository import prune_old_messages

log = logging.getLogger(__name__)

# Platforms retry an event for minutes at most (Slack: 3 tries within about an hour).
EVENT_MEMORY = dt.timedelta(days=2)


@dataclass(frozen=True)
class Pruned:
    messages: int
    link_codes: int
    events: int


async def prune_once(settings: Settings, sessions: async_sessionmaker[AsyncSession], now: dt.datetime) -> Pruned:
    """Delete what the bot no longer keeps at `now`: messages past BOT_HISTORY_RETENTION_DAYS (0 keeps them)."""
    async with sessions() as session, session.begin():
        messages = 0
        if settings.history_retention_days:
            cut = now - dt.timedelta(days=settings.history_retention_days)
            messages = await prune_old_messages(session, older_than=cut)
        codes = await prune_link_codes(session, now=now)
        events = await prune_processed_events(session, older_than=now - EVENT_MEMORY)
    return Pruned(messages, codes, events)


async def prune_forever(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], *, every: float = 3600.0, retry: float = 5.0
) -> None:
    """Run prune_once now and then every `every` seconds, until cancelled.

    A failed round is logged and tried again sooner: after `retry` seconds, doubling while it
    keeps failing (the database is down, say), up to `every`.
    """
    failures = 0
    while True:
        try:
            pruned = await prune_once(settings, sessions, utcnow())
        except Exception as exc:
            delay = min(every, retry * 2**failures)
            failures += 1
            if is_outage(exc):
                log.warning("pruning: database unreachable (%s); trying again in %.0f s", outage_reason(exc), delay)
            else:
                log.exception("pruning failed; trying again in %.0f s", delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        if pruned.messages or pruned.link_codes or pruned.events:
            log.info("pruned %s", pruned)
        await asyncio.sleep(every)
