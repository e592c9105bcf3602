"""storage.db: engines from URLs, SQLite connection settings, the session factory."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Identity, User


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "could not parse"),
        ("sqlite:///data/bot.db", "not an async driver"),
        ("postgresql://bot@localhost/bot", "not an async driver"),
        ("postgresql+psycopg2://bot@localhost/bot", "not an async driver"),
        ("mysql+aiomysql://bot@localhost/bot", "not supported"),
    ],
)
def test_bad_urls_are_refused_with_the_fix(url: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected) as raised:
        make_engine(url)
    assert "sqlite+aiosqlite://" in str(raised.value)
    assert "postgresql+asyncpg://" in str(raised.value)


def test_bad_url_message_hides_the_password() -> None:
    with pytest.raises(ValueError) as raised:
        make_engine("postgresql://bot:hunter2@localhost/bot")
    assert "hunter2" not in str(raised.value)


async def test_sqlite_file_connections_are_configured(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "bot.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}", pool_size=2, pool_timeout=7.5)
    try:
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 7500}
        assert path.parent.is_dir()
        assert engine.pool.size() == 1, "SQLite has one writer: one connection, a fair queue for it"
    finally:
        await engine.dispose()


async def test_sqlite_memory_database_works() -> None:
    engine = make_engine("sqlite+aiosqlite://", pool_size=3)
    try:
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT 1")).scalar() == 1
    finally:
        await engine.dispose()


async def test_pool_settings_reach_the_pool(db_url: str, db_backend: str) -> None:
    if db_backend == "sqlite":
        pytest.skip("a SQLite file database always has one connection")
    engine = make_engine(db_url, pool_size=3, max_overflow=1, pool_timeout=2)
    try:
        assert engine.pool.size() == 3
        assert engine.pool.timeout() == 2
    finally:
        await engine.dispose()


async def test_foreign_keys_are_enforced(session: AsyncSession) -> None:
    session.add(Identity(user_id=999, platform="console", platform_user_id="me", display_name="me"))
    with pytest.raises(IntegrityError):
        await session.flush()


async def test_savepoint_rolls_back_only_its_own_work(session: AsyncSession) -> None:
    session.add(User(display_name="kept"))
    await session.flush()
    savepoint = await session.begin_nested()
    session.add(User(display_name="dropped"))
    await session.flush()
    await savepoint.rollback()
    await session.commit()

    names = (await session.scalars(select(User.display_name))).all()
    assert names == ["kept"]


async def test_objects_stay_usable_after_commit(engine: AsyncEngine) -> None:
    factory: async_sessionmaker[AsyncSession] = make_session_factory(engine)
    async with factory() as session:
        user = User(display_name="Ann")
        session.add(user)
        await session.commit()
        # With expire_on_commit=True this would need a lazy load, which async forbids.
        assert user.display_name == "Ann"
