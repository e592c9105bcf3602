"""aiosqlite connections that run each statement in one hand-over to their thread.

SQLAlchemy's aiosqlite adapter awaits four driver calls per statement (cursor, execute,
fetchall, close), and each is a trip to aiosqlite's worker thread and back to the event
loop. Every message the bot answers runs about ten statements, so those trips were
a large part of the core's own time. Here the cursor is made, executed, read and
closed by one function on the worker thread; the awaits SQLAlchemy makes afterwards
return what that trip already fetched. Everything else is aiosqlite's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiosqlite

_Result = tuple[Any, int | None, int, list[Any]]  # description, lastrowid, rowcount, rows


class OneHopConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors cost no trip of their own."""

    async def cursor(self) -> OneHopCursor:  # type: ignore[override]
        return OneHopCursor(self)


class OneHopCursor:
    """The aiosqlite cursor calls SQLAlchemy's adapter makes, each statement in a single trip.

    Rows are read in full on the worker thread (the bot never streams results from SQLite).
    """

    arraysize = 1

    def __init__(self, connection: OneHopConnection) -> None:
        self._connection = connection
        self.description: Any = None
        self.lastrowid: int | None = None
        self.rowcount = -1
        self._rows: list[Any] = []

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> OneHopCursor:
        return await self._run(lambda cursor: cursor.execute(sql, parameters))

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any] | dict[str, Any]]) -> OneHopCursor:
        return await self._run(lambda cursor: cursor.executemany(sql, parameters))

    async def _run(self, statement: Callable[[sqlite3.Cursor], object]) -> OneHopCursor:
        def on_thread() -> _Result:
            cursor = self._connection._conn.cursor()
            try:
                statement(cursor)
                rows = cursor.fetchall() if cursor.description else []
                return cursor.description, cursor.lastrowid, cursor.rowcount, rows
            finally:
                cursor.close()

        self.description, self.lastrowid, self.rowcount, self._rows = await self._connection._execute(on_thread)
        return self

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        taken, self._rows = self._rows[:count], self._rows[count:]
        return taken

    async def fetchall(self) -> list[Any]:
        taken, self._rows = self._rows, []
        return taken

    async def close(self) -> None:
        self._rows = []


def connect(database: str, **kwargs: Any) -> OneHopConnection:
    """Like aiosqlite.connect (await the result); `kwargs` go to sqlite3.connect."""
    connection = OneHopConnection(lambda: sqlite3.connect(database, **kwargs), iter_chunk_size=64)
    # As SQLAlchemy does for aiosqlite's own connections: an unclosed one must not keep the process alive.
    connection._thread.daemon = True
    return connection
