"""storage.sqlite_driver: SQLite statements through SQLAlchemy in one trip each to aiosqlite's thread."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.db import make_engine, migrate
from storage.models import User, utcnow
from storage.sqlite_driver import OneHopConnection


class CountingQueue:
    """Stands in front of an aiosqlite connection's work queue and counts what is handed to its thread."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.trips = 0

    def put_nowait(self, item: Any) -> None:
        self.trips += 1
        self.queue.put_nowait(item)

    def get(self) -> Any:
        return self.queue.get()


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


async def counting(connection: AsyncConnection) -> CountingQueue:
    raw = (await connection.get_raw_connection()).driver_connection
    assert isinstance(raw, OneHopConnection)
    counter = CountingQueue(raw._tx)
    raw._tx = counter  # type: ignore[assignment]  # the worker thread holds the queue itself: only puts are seen
    return counter


async def test_a_query_with_rows_is_one_trip(sqlite_engine: AsyncEngine) -> None:
    async with sqlite_engine.begin() as connection:  # BEGIN IMMEDIATE: a trip of its own, before counting
        trips = await counting(connection)
        rows = (await connection.execute(text("SELECT value FROM json_each('[1,2,3]') ORDER BY value"))).all()
        assert [r[0] for r in rows] == [1, 2, 3]
        assert trips.trips == 1  # aiosqlite's own cursor takes four: cursor, execute, fetchall, close


async def test_writes_report_ids_and_counts_and_commit(sqlite_engine: AsyncEngine) -> None:
    now = utcnow()
    async with sqlite_engine.begin() as connection:
        trips = await counting(connection)
        result = await connection.execute(insert(User).values(display_name="ana", created_at=now, last_seen_at=now))
        assert result.inserted_primary_key is not None and result.inserted_primary_key[0] >= 1
        many = await connection.execute(
            insert(User), [{"display_name": f"u{i}", "created_at": now, "last_seen_at": now} for i in range(5)]
        )
        assert many.rowcount == 5
        assert trips.trips == 2
    async with sqlite_engine.connect() as connection:
        names = (await connection.execute(select(User.display_name).order_by(User.id))).scalars().all()
    assert names == ["ana", "u0", "u1", "u2", "u3", "u4"]


async def test_errors_are_sqlalchemys_and_the_connection_goes_on(sqlite_engine: AsyncEngine) -> None:
    async with sqlite_engine.connect() as connection:
        with pytest.raises(OperationalError, match="no such table"):
            await connection.execute(text("SELECT * FROM no_such_table"))
        await connection.rollback()
        with pytest.raises(IntegrityError):
            await connection.execute(text("INSERT INTO users (id, display_name) VALUES (NULL, NULL)"))
        await connection.rollback()
        assert (await connection.execute(text("SELECT 41 + 1"))).scalar() == 42


async def test_streamed_results_come_in_parts(sqlite_engine: AsyncEngine) -> None:
    async with sqlite_engine.connect() as connection:
        result = await connection.stream(text("SELECT value FROM json_each('[1,2,3,4,5]') ORDER BY value"))
        parts = [[row[0] for row in part] async for part in result.partitions(2)]
    assert parts == [[1, 2], [3, 4], [5]]
