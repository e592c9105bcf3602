"""No user sees, changes or deletes another user's data: every function that takes a user, with two users.

Alice and Bruno each have a conversation in the same place, messages, preferences, token
counts and a link code. Each function is called for Alice: a read must show nothing of
Bruno's, and afterwards Bruno's data must be exactly as before. (merge_users joins two
users by design; tests/storage/test_linking.py shows it leaves a third one alone.)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.access import quota_for
from bot.config import Settings
from storage.bans import set_banned
from storage.linking import add_link_code, detach_identity, find_identity, identities_of, merge_users
from storage.models import LinkCode, User
from storage.privacy import export_user_data, forget_user_data, recent_history
from storage.repository import (
    add_message,
    count_messages,
    get_active_conversation,
    get_or_create_user,
    start_new_conversation,
)
from storage.usage import add_usage, usage_by_day, usage_for
from storage.user_settings import get_user_settings, preferences_for, reset_preferences, set_preference

DAY = dt.date(2025, 3, 14)
EXPIRES = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
PLACE = {"platform": "slack", "place": "slack:T1:C1", "is_dm": False}
NEW_PLACE = {"platform": "slack", "place": "slack:T1:C2", "is_dm": False}
# Bruno's count has 9 digits in a row, which no timestamp has, so it can be searched for.
TOKENS = {"alice": 111, "bruno": 987_654_321}


def _settings() -> Settings:
    return Settings(_env_file=None, model_path=Path(__file__).parent, daily_token_quota=1000)


async def _populate(session: AsyncSession, name: str) -> User:
    user = await get_or_create_user(
        session, platform="slack", workspace_id="T1", platform_user_id=name, display_name=f"{name}-name"
    )
    second = await get_or_create_user(
        session, platform="discord", workspace_id="G1", platform_user_id=name, display_name=f"{name}-name"
    )
    await merge_users(session, source_user_id=second.id, target_user_id=user.id)
    conversation = await get_active_conversation(session, user_id=user.id, **PLACE)
    await add_message(session, conversation_id=conversation.id, role="user", text=f"{name}-secret", token_count=3)
    await add_message(session, conversation_id=conversation.id, role="bot", text=f"{name}-reply", token_count=3)
    await set_preference(session, user_id=user.id, name="persona", value=f"{name}-persona")
    await add_usage(session, user_id=user.id, day=DAY, tokens=TOKENS[name])
    await add_link_code(session, user_id=user.id, code_hash=hashlib.sha256(name.encode()).hexdigest(), expires_at=EXPIRES)
    await session.commit()
    return user


async def _everything_of(session: AsyncSession, user_id: int) -> str:
    """All stored data of a user, as text to compare before and after."""
    session.expunge_all()
    data = await export_user_data(session, user_id=user_id)
    codes = (await session.scalars(select(LinkCode.code_hash).where(LinkCode.user_id == user_id))).all()
    return json.dumps({"data": data, "codes": codes}, sort_keys=True)


async def _detach_alice(session: AsyncSession, alice: int) -> object:
    identity = await find_identity(session, platform="discord", workspace_id="G1", platform_user_id="alice")
    assert identity is not None
    return await detach_identity(session, identity_id=identity.id, today=DAY)


async def _plain(value: Awaitable[Any]) -> Any:
    """Awaited, and ORM rows turned into their column values, so they can be searched as text."""
    result = await value
    rows = result if isinstance(result, list) else [result]
    if rows and hasattr(rows[0], "__table__"):
        return [{c.name: getattr(row, c.name) for c in row.__table__.columns} for row in rows]
    return result


Operation = Callable[[AsyncSession, int], Awaitable[Any]]

READS: dict[str, Operation] = {
    "recent_history": lambda s, u: _plain(recent_history(s, user_id=u, limit=100)),
    "export_user_data": lambda s, u: export_user_data(s, user_id=u),
    "count_messages": lambda s, u: count_messages(s, user_id=u),
    "usage_for": lambda s, u: usage_for(s, user_id=u, day=DAY),
    "usage_by_day": lambda s, u: usage_by_day(s, user_id=u, since=DAY - dt.timedelta(days=30)),
    "quota_for": lambda s, u: quota_for(s, settings=_settings(), user_id=u, today=DAY),
    "get_user_settings": lambda s, u: _plain(get_user_settings(s, user_id=u)),
    "preferences_for": lambda s, u: preferences_for(s, user_id=u, defaults=_settings()),
    "identities_of": lambda s, u: _plain(identities_of(s, user_id=u)),
    "get_active_conversation": lambda s, u: _plain(get_active_conversation(s, user_id=u, **PLACE)),
}

WRITES: dict[str, Operation] = {
    "get_active_conversation": lambda s, u: get_active_conversation(s, user_id=u, **NEW_PLACE),
    "start_new_conversation": lambda s, u: start_new_conversation(s, user_id=u, **PLACE),
    "set_preference": lambda s, u: set_preference(s, user_id=u, name="temperature", value=0.3),
    "reset_preferences": lambda s, u: reset_preferences(s, user_id=u),
    "add_usage": lambda s, u: add_usage(s, user_id=u, day=DAY, tokens=5),
    "add_link_code": lambda s, u: add_link_code(s, user_id=u, code_hash="f" * 64, expires_at=EXPIRES),
    "forget_user_data": lambda s, u: forget_user_data(s, user_id=u),
    "set_banned": lambda s, u: set_banned(s, user_id=u, banned=True),
    "detach_identity": _detach_alice,
}


@pytest.fixture
async def alice_and_bruno(session: AsyncSession) -> tuple[int, int]:
    alice, bruno = await _populate(session, "alice"), await _populate(session, "bruno")
    return alice.id, bruno.id


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
async def test_reads_show_nothing_of_another_user(
    session: AsyncSession, alice_and_bruno: tuple[int, int], read: Operation
) -> None:
    alice, bruno = alice_and_bruno
    seen = json.dumps(await read(session, alice), default=repr)
    assert "bruno" not in seen and str(TOKENS["bruno"]) not in seen
    # The read works at all: Bruno sees his own data through it.
    await session.rollback()
    assert "alice" not in json.dumps(await read(session, bruno), default=repr)


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
async def test_writes_leave_another_user_as_they_were(
    session: AsyncSession, alice_and_bruno: tuple[int, int], write: Operation
) -> None:
    alice, bruno = alice_and_bruno
    before_bruno, before_alice = await _everything_of(session, bruno), await _everything_of(session, alice)

    await write(session, alice)
    await session.commit()

    assert await _everything_of(session, bruno) == before_bruno
    assert await _everything_of(session, alice) != before_alice, "the write changed nothing at all"
