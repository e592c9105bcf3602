"""Storage speed: messages stored per second, and the time to load a 50-turn history, with 1 and 20 writers.

Each writer stores one message per transaction, as the bot does; meanwhile one reader
loads the newest 50 messages of a conversation, each load a transaction of its own.
SQLite runs on a temporary file; PostgreSQL, when a URL is given or TEST_DATABASE_URL is
set, on a temporary database created on that server and dropped afterwards. Usage:

    python bench/storage_bench.py [--postgres postgresql+asyncpg://user@host/db] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.db import make_engine, make_session_factory, migrate  # noqa: E402
from storage.repository import (  # noqa: E402
    add_message,
    get_active_conversation,
    get_or_create_user,
    recent_messages,
)

HISTORY_TURNS = 50
WRITER_COUNTS = (1, 20)
TEXT = "A message of ordinary length, about as long as people write to a chat bot. " * 2


@dataclass(frozen=True)
class Result:
    writers: int
    messages_per_second: float
    load_ms: list[float]


async def _conversation(factory: async_sessionmaker[AsyncSession], name: str) -> int:
    async with factory() as session, session.begin():
        user = await get_or_create_user(
            session, platform="console", workspace_id="", platform_user_id=name, display_name=name
        )
        conversation = await get_active_conversation(
            session, user_id=user.id, platform="console", place="console:dm", is_dm=True
        )
        return conversation.id


async def _store(factory: async_sessionmaker[AsyncSession], conversation_id: int) -> None:
    async with factory() as session, session.begin():
        await add_message(session, conversation_id=conversation_id, role="user", text=TEXT, token_count=30)


async def _load(factory: async_sessionmaker[AsyncSession], conversation_id: int) -> float:
    """Milliseconds to load the newest 50 messages, in a transaction as the bot does."""
    started = time.perf_counter()
    async with factory() as session, session.begin():
        history = await recent_messages(session, conversation_id=conversation_id, limit=HISTORY_TURNS)
    assert len(history) == HISTORY_TURNS
    return (time.perf_counter() - started) * 1000


async def _scenario(
    factory: async_sessionmaker[AsyncSession], writers: int, history_id: int, seconds: float
) -> Result:
    conversations = [await _conversation(factory, f"writer-{writers}-{n}") for n in range(writers)]
    stored = 0
    load_ms: list[float] = []
    deadline = time.perf_counter() + seconds

    async def write(conversation_id: int) -> None:
        nonlocal stored
        while time.perf_counter() < deadline:
            await _store(factory, conversation_id)
            stored += 1

    async def read() -> None:
        while time.perf_counter() < deadline:
            load_ms.append(await _load(factory, history_id))

    started = time.perf_counter()
    await asyncio.gather(read(), *(write(c) for c in conversations))
    return Result(writers, stored / (time.perf_counter() - started), load_ms)


async def run_backend(url: str, seconds: float) -> list[Result]:
    """Both scenarios on one migrated, empty database."""
    engine = make_engine(url, pool_size=max(WRITER_COUNTS) + 2, max_overflow=0)
    try:
        await migrate(engine)
        factory = make_session_factory(engine)
        history_id = await _conversation(factory, "reader")
        for _ in range(HISTORY_TURNS * 2):
            await _store(factory, history_id)
        await _load(factory, history_id)  # warm the pool and the caches
        return [await _scenario(factory, writers, history_id, seconds) for writers in WRITER_COUNTS]
    finally:
        await engine.dispose()


async def _on_server(server_url: str, statement: str) -> None:
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


@asynccontextmanager
async def temporary_postgres(server_url: str) -> AsyncIterator[str]:
    """A new database on the server of `server_url`, dropped afterwards."""
    name = f"bench_gptbot_{uuid.uuid4().hex[:12]}"
    await _on_server(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _on_server(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def main_async(postgres_url: str | None, seconds: float) -> None:
    results: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["sqlite"] = await run_backend(f"sqlite+aiosqlite:///{folder}/bench.db", seconds)
    if postgres_url:
        async with temporary_postgres(postgres_url) as url:
            results["postgresql"] = await run_backend(url, seconds)

    print(
        f"SQLAlchemy {sqlalchemy.__version__}, {os.cpu_count()} CPUs, {seconds:g} s per row, "
        f"one message per transaction, history = newest {HISTORY_TURNS} messages"
    )
    header = (
        f"{'backend':<11} {'writers':>7} {'messages/s':>11} "
        f"{'history p50 ms':>15} {'p95 ms':>8} {'max ms':>8} {'loads':>6}"
    )
    print(header)
    print("-" * len(header))
    for backend, rows in results.items():
        for r in rows:
            print(
                f"{backend:<11} {r.writers:>7} {r.messages_per_second:>11,.0f} "
                f"{statistics.median(r.load_ms):>15.2f} {_percentile(r.load_ms, 95):>8.2f} "
                f"{max(r.load_ms):>8.2f} {len(r.load_ms):>6}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TEST_DATABASE_URL"),
        help="PostgreSQL server URL (postgresql+asyncpg://...); default: TEST_DATABASE_URL; none: SQLite only",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each scenario runs (default 3)")
    args = parser.parse_args()
    asyncio.run(main_async(args.postgres, args.seconds))


if __name__ == "__main__":
    main()
