"""Fairness: a per-account rate limit and ordered, bounded queues per user and place."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


class RateLimiter:
    """A token bucket per key: `count` messages per `period` seconds, refilled continuously."""

    def __init__(self, count: int, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.period = period
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key → (tokens, when)

    def wait_time(self, key: Hashable) -> float:
        """0 if the key may go now (and it is counted), else the seconds until it may."""
        if self.count <= 0:
            return 0.0
        now = self.clock()
        tokens, when = self._buckets.get(key, (float(self.count), now))
        tokens = min(float(self.count), tokens + (now - when) * self.count / self.period)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) * self.period / self.count

    def forget_idle(self) -> None:
        """Drop full buckets, so the table does not grow with every account ever seen."""
        now = self.clock()
        full = [k for k, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.count / self.period >= self.count]
        for key in full:
            del self._buckets[key]


def seconds_text(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))} s"


@dataclass
class _Line:
    tail: asyncio.Future[None] | None = None
    waiting: int = 0


@dataclass
class Turnstile:
    """Lets the requests of one key through one at a time, in the order they arrived.

    A place in line is taken synchronously by `enter`, before the caller awaits
    anything, so arrival order is kept even when later steps await I/O.
    """

    max_waiting: int
    _lines: defaultdict[Hashable, _Line] = field(default_factory=lambda: defaultdict(_Line))

    @property
    def occupied(self) -> int:
        """Keys with a request being served or waiting (the active conversations of /metrics)."""
        return len(self._lines)

    def enter(self, key: Hashable) -> Ticket | None:
        """A ticket for key, or None when max_waiting requests are already in line."""
        line = self._lines[key]
        if line.waiting >= self.max_waiting:
            return None
        ticket = Ticket(self, key, line.tail, asyncio.get_running_loop().create_future())
        line.tail = ticket.done
        line.waiting += 1
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        line = self._lines[ticket.key]
        line.waiting -= 1
        if line.tail is ticket.done:  # nobody behind: forget the line
            del self._lines[ticket.key]
        # The next in line goes only after everyone ahead, even if this ticket gave up early.
        if ticket.before is None or ticket.before.done():
            _finish(ticket.done)
        else:
            ticket.before.add_done_callback(lambda _: _finish(ticket.done))


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class Ticket:
    """One request's place in a Turnstile line; `async with ticket:` waits for the turn and leaves after."""

    turnstile: Turnstile
    key: Hashable
    before: asyncio.Future[None] | None
    done: asyncio.Future[None]

    async def __aenter__(self) -> Ticket:
        if self.before is not None:
            try:
                await asyncio.shield(self.before)
            except BaseException:  # cancelled while waiting: give the place up
                self.leave()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def leave(self) -> None:
        self.turnstile._leave(self)
