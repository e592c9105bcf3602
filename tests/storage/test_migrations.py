"""Alembic migrations: the head schema matches the models, and down/up round trips work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import MIGRATIONS_DIR, current_revision, downgrade, make_engine, migrate
from storage.models import Base

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = "0001_initial"


def _schema_differences(connection: Connection) -> list:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _differences(engine: AsyncEngine) -> list:
    async with engine.connect() as connection:
        return await connection.run_sync(_schema_differences)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(_table_names)


async def test_head_schema_matches_the_models(engine: AsyncEngine) -> None:
    assert await current_revision(engine) == HEAD
    assert await _differences(engine) == []


async def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert await current_revision(engine) is None
        await migrate(engine)
        assert await current_revision(engine) == HEAD
        assert set(Base.metadata.tables) <= await _tables(engine)

        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        assert await _tables(engine) <= {"alembic_version"}

        await migrate(engine)
        assert await current_revision(engine) == HEAD
        assert await _differences(engine) == []
    finally:
        await engine.dispose()


async def test_migrating_an_up_to_date_database_changes_nothing(engine: AsyncEngine) -> None:
    await migrate(engine)
    assert await current_revision(engine) == HEAD


async def test_sqlite_foreign_keys_are_back_on_after_migrating(tmp_path: Path) -> None:
    # One pooled connection, so the check sees the very connection that migrated.
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", pool_size=1, max_overflow=0)
    try:
        await migrate(engine)
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await engine.dispose()


def _alembic_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_alembic_cli_upgrades_the_database_from_settings(tmp_path: Path) -> None:
    pytest.importorskip("bot.config", reason="bot.config.Settings is not written yet")
    database = tmp_path / "nested" / "cli.db"
    url = f"sqlite+aiosqlite:///{database}"
    env = {
        "BOT_DATABASE_URL": url,
        # Settings insists on an existing model folder; migrating needs none.
        "BOT_MODEL_PATH": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
    }

    upgraded = await asyncio.to_thread(_alembic_cli, "upgrade", "head", cwd=tmp_path, env=env)

    assert upgraded.returncode == 0, upgraded.stderr
    engine = make_engine(url)
    try:
        assert await current_revision(engine) == HEAD
        assert await _differences(engine) == []
    finally:
        await engine.dispose()


def test_autogenerate_renders_plain_sqlalchemy_types(tmp_path: Path) -> None:
    """New migrations must not import storage.models (it changes after they are written)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(tmp_path))
    config.set_main_option("sqlalchemy.url", f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")

    command.revision(config, message="everything", autogenerate=True, rev_id="9999")

    (script,) = tmp_path.glob("9999_*.py")
    source = script.read_text()
    assert "storage" not in source
    assert "sa.DateTime(timezone=True)" in source
    compile(source, str(script), "exec")
