"""Per-user preferences over the defaults from Settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.config import Settings
from storage.repository import get_or_create_user
from storage.user_settings import (
    Preferences,
    get_user_settings,
    parse_preference,
    preferences_for,
    reset_preferences,
    set_preference,
)


@pytest.fixture
def defaults(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, model_path=tmp_path, persona="Default persona.", temperature=0.8, max_reply_tokens=96)


async def _user(session: AsyncSession, name: str = "ann") -> int:
    user = await get_or_create_user(session, platform="console", workspace_id="", platform_user_id=name, display_name=name)
    await session.commit()
    return user.id


async def test_defaults_until_the_user_chooses(session: AsyncSession, defaults: Settings) -> None:
    user_id = await _user(session)
    assert await get_user_settings(session, user_id=user_id) is None
    assert await preferences_for(session, user_id=user_id, defaults=defaults) == Preferences(
        persona="Default persona.", temperature=0.8, max_reply_tokens=96, display_name=None
    )

    await set_preference(session, user_id=user_id, name="temperature", value=0.2)
    await set_preference(session, user_id=user_id, name="persona", value="  A pirate.\x00 ")
    await set_preference(session, user_id=user_id, name="name", value="Captain")
    await session.commit()

    assert await preferences_for(session, user_id=user_id, defaults=defaults) == Preferences(
        persona="A pirate.", temperature=0.2, max_reply_tokens=96, display_name="Captain"
    )


async def test_none_and_reset_go_back_to_the_defaults(session: AsyncSession, defaults: Settings) -> None:
    user_id = await _user(session)
    await set_preference(session, user_id=user_id, name="temperature", value=0.2)
    await set_preference(session, user_id=user_id, name="length", value=50)
    await set_preference(session, user_id=user_id, name="temperature", value=None)
    await session.commit()
    preferences = await preferences_for(session, user_id=user_id, defaults=defaults)
    assert (preferences.temperature, preferences.max_reply_tokens) == (0.8, 50)

    await reset_preferences(session, user_id=user_id)
    await session.commit()
    assert await get_user_settings(session, user_id=user_id) is None


async def test_reply_length_is_capped_by_the_admins_limit(session: AsyncSession, defaults: Settings) -> None:
    user_id = await _user(session)
    await set_preference(session, user_id=user_id, name="length", value=4000)
    assert (await preferences_for(session, user_id=user_id, defaults=defaults)).max_reply_tokens == 96


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("colour", "blue", "no setting 'colour'"),
        ("temperature", 2.5, "from 0 to 2"),
        ("temperature", float("nan"), "a number"),
        ("temperature", "hot", "must be a number"),
        ("length", 0, "from 1 to 4096"),
        ("length", 12.5, "whole number"),
        ("persona", "  ", "1 to 2000 characters"),
        ("persona", "x" * 2001, "1 to 2000 characters"),
        ("name", "y" * 256, "1 to 255 characters"),
    ],
)
async def test_bad_values_are_refused_with_a_clear_message(
    session: AsyncSession, name: str, value: object, problem: str
) -> None:
    user_id = await _user(session)
    with pytest.raises(ValueError, match=problem):
        await set_preference(session, user_id=user_id, name=name, value=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [("temperature", " 0.5 ", 0.5), ("length", "64", 64), ("persona", "A cat.", "A cat."), ("name", "Jo", "Jo")],
)
def test_parse_preference(name: str, text: str, value: object) -> None:
    assert parse_preference(name, text) == value


@pytest.mark.parametrize(("name", "text"), [("temperature", "warm"), ("length", "10.5"), ("size", "3")])
def test_parse_preference_refuses_nonsense(name: str, text: str) -> None:
    with pytest.raises(ValueError):
        parse_preference(name, text)


async def test_concurrent_first_changes_both_land(session_factory: async_sessionmaker[AsyncSession]) -> None:
    async with session_factory() as session:
        user_id = await _user(session)
    barrier = asyncio.Barrier(2)

    async def change(name: str, value: float | str) -> None:
        async with session_factory() as session:
            await barrier.wait()
            await set_preference(session, user_id=user_id, name=name, value=value)
            await session.commit()

    await asyncio.gather(change("temperature", 1.5), change("persona", "Terse."))
    async with session_factory() as session:
        row = await get_user_settings(session, user_id=user_id)
    assert row is not None and (row.temperature, row.persona) == (1.5, "Terse.")
