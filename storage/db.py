"""Async engine and session factory from a URL, and migrations run from code."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from storage import sqlite_driver
from storage.sqlite_driver import OneHopConnection

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The advisory lock id that serialises migrations (any fixed 64-bit number; turn locks are hashes).
MIGRATION_LOCK_ID = 0x67707462_6D696772  # "gptbmigr"
CONNECT_TIMEOUT = 10.0  # seconds

_SUPPORTED = "use sqlite+aiosqlite:///path/to/bot.db or postgresql+asyncpg://user:password@host/dbname"


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    echo: bool = False,
) -> AsyncEngine:
    """Create an async engine for SQLite (aiosqlite) or PostgreSQL (asyncpg).

    SQLite: the file's folder is created; one connection (pool_size and max_overflow
    are for PostgreSQL) with WAL, foreign keys and a busy timeout of `pool_timeout`;
    every transaction starts with BEGIN IMMEDIATE,
    i.e. holds the database's single write lock until it ends, so keep sessions short
    (never open across a model generation). Raises ValueError for a URL that cannot
    be parsed or names another database or a non-async driver.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"could not parse the database URL: {_SUPPORTED}") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "sqlite" and driver == "aiosqlite":
        return _make_sqlite_engine(parsed, pool_timeout=pool_timeout, echo=echo)
    if backend == "postgresql" and driver == "asyncpg":
        return create_async_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_pre_ping=True,
            # A server that drops packets instead of refusing: give up on a connect after this
            # long (asyncpg waits 60 s), so a turn answers "try again shortly" in good time.
            connect_args={"timeout": CONNECT_TIMEOUT},
            echo=echo,
        )
    shown = parsed.render_as_string(hide_password=True)
    if backend in ("sqlite", "postgresql"):
        problem = f"{shown!r} uses the driver {driver!r}, which is not an async driver"
    else:
        problem = f"{shown!r} is a {backend!r} database, which is not supported"
    raise ValueError(f"unsupported database URL: {problem}; {_SUPPORTED}")


def _is_memory_database(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _make_sqlite_engine(url: URL, *, pool_timeout: float, echo: bool) -> AsyncEngine:
    pool_args: dict[str, Any] = {}
    if not _is_memory_database(url):
        assert url.database is not None
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection: every transaction takes SQLite's single write lock (see _on_begin),
        # so more connections would only busy-wait for it; the pool's queue is fair instead.
        # :memory: uses a StaticPool without these knobs.
        pool_args = {"pool_size": 1, "max_overflow": 0, "pool_timeout": pool_timeout}

    def connect() -> OneHopConnection:
        # The driver arguments SQLAlchemy would give aiosqlite for this URL.
        args, kwargs = engine.sync_engine.dialect.create_connect_args(url)
        return sqlite_driver.connect(*args, **kwargs)

    # One trip to aiosqlite's thread per statement instead of four (see storage/sqlite_driver.py).
    engine = create_async_engine(url, echo=echo, async_creator=connect, **pool_args)
    busy_timeout_ms = int(pool_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 module from issuing its own (late, DML-only) BEGIN; _on_begin
        # issues it instead, which makes SAVEPOINT and transactional DDL behave.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout). A deferred
        # transaction that reads and then writes fails at once with "database is locked"
        # when another connection wrote in between; SQLite has one writer anyway.
        # Straight on the driver's connection: one hand-over to aiosqlite's thread instead of
        # the four (cursor, execute, fetch, close) of a statement; BEGIN returns no rows.
        connection.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]

    return engine


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """A session factory whose objects stay usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> Config:
    # No alembic.ini: its logging section would reconfigure the application's logging.
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


async def _run_alembic(engine: AsyncEngine, fn: Callable[[Config, str], None], revision: str) -> None:
    config = _alembic_config()

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        fn(config, revision)

    # A connection with no transaction open: env.py begins and commits it, after it has
    # switched SQLite's foreign keys off (which cannot be done inside a transaction).
    async with engine.connect() as connection, _one_migrator(connection):
        await connection.run_sync(run)


@asynccontextmanager
async def _one_migrator(connection: AsyncConnection) -> AsyncIterator[None]:
    """On PostgreSQL, processes starting together migrate one after another; the later ones find nothing to do.

    A session-level advisory lock, taken and released in transactions of their own so that
    alembic still gets a connection with none open.
    """
    if connection.dialect.name != "postgresql":
        yield
        return
    await connection.execute(select(func.pg_advisory_lock(MIGRATION_LOCK_ID)))
    await connection.commit()
    try:
        yield
    finally:
        await connection.rollback()  # whatever a failed migration left open
        await connection.execute(select(func.pg_advisory_unlock(MIGRATION_LOCK_ID)))
        await connection.commit()


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database to `revision`; safe to call from inside a running event loop."""
    await _run_alembic(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Downgrade the database to `revision` ("base" removes every table)."""
    await _run_alembic(engine, command.downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)


__all__ = [
    "MIGRATIONS_DIR",
    "current_revision",
    "downgrade",
    "make_engine",
    "make_session_factory",
    "migrate",
]
