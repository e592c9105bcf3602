"""Database outages: telling a lost or refused connection from other errors, and riding out a short one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")

# A user's turn waits this long (about 2 s in all) for the database before "try again shortly".
TURN_RETRY_DELAYS = (0.2, 0.5, 1.0)

# SQLSTATEs of a server that is there but cannot serve now: connection exceptions (08...),
# shutting down or starting up (57P01-57P03), out of connection slots (53300).
_UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_outage(exc: BaseException) -> bool:
    """True when exc says the database cannot be reached now (worth retrying later), not a bug or bad data.

    Refused or timed-out connects surface as OSError (asyncpg raises them unwrapped); a connection
    lost in the middle of a statement as a DBAPIError that SQLAlchemy marks connection_invalidated
    (it then replaces the pool's connections, and pool_pre_ping tests each one handed out).
    """
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or _unavailable_state(exc.orig)
    if isinstance(exc, PoolTimeout):  # every pooled connection stayed busy, e.g. stuck on a dead server
        return True
    return isinstance(exc, OSError) or _unavailable_state(exc)


def _unavailable_state(exc: BaseException | None) -> bool:
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(_UNAVAILABLE_STATES)


async def retrying(call: Callable[[], Awaitable[T]], *, delays: Sequence[float], what: str) -> T:
    """await call(), and again after each of delays while it fails with an outage; then the outage is raised.

    Only for calls that are safe to repeat: a transaction that failed with a lost connection
    was not committed (the rare commit lost on its way back is the exception).
    """
    for delay in delays:
        try:
            return await call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("database unreachable while %s (%s); trying again in %.1f s", what, outage_reason(exc), delay)
        await asyncio.sleep(delay)
    return await call()


def outage_reason(exc: BaseException) -> str:
    """One line saying why: the driver's message rather than SQLAlchemy's long wrapper."""
    orig = getattr(exc, "orig", None)
    return (str(orig or exc).splitlines() or [type(exc).__name__])[0]
