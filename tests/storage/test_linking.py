"""Link codes, merging two users and detaching an account, in SQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.linking import (
    add_link_code,
    detach_identity,
    find_identity,
    find_link_code,
    identities_of,
    merge_users,
    prune_link_codes,
    use_link_code,
)
from storage.models import Conversation, IdentityEvent, LinkCode, User
from storage.privacy import export_user_data, recent_history
from storage.repository import add_message, get_active_conversation, get_or_create_user
from storage.usage import add_usage, usage_for
from storage.user_settings import get_user_settings, set_preference

NOW = dt.datetime(2025, 3, 14, 12, 0, tzinfo=dt.timezone.utc)
TODAY = NOW.date()


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def _user(session: AsyncSession, platform: str, name: str, workspace_id: str = "") -> User:
    return await get_or_create_user(
        session, platform=platform, workspace_id=workspace_id, platform_user_id=name, display_name=name
    )


async def _say(session: AsyncSession, user: User, place: str, text: str) -> Conversation:
    platform = place.split(":")[0]
    conversation = await get_active_conversation(
        session, user_id=user.id, platform=platform, place=place, is_dm=place.endswith(":dm")
    )
    await add_message(session, conversation_id=conversation.id, role="user", text=text, token_count=1)
    return conversation


async def test_a_new_code_replaces_the_users_earlier_ones(session: AsyncSession) -> None:
    ann, bob = await _user(session, "slack", "ann"), await _user(session, "slack", "bob")
    await add_link_code(session, user_id=ann.id, code_hash=_hash("one"), expires_at=NOW)
    await add_link_code(session, user_id=bob.id, code_hash=_hash("bob"), expires_at=NOW)
    newest = await add_link_code(session, user_id=ann.id, code_hash=_hash("two"), expires_at=NOW)
    await session.commit()

    assert await find_link_code(session, code_hash=_hash("one")) is None
    found = await find_link_code(session, code_hash=_hash("two"))
    assert found is not None and (found.id, found.user_id, found.used_at) == (newest.id, ann.id, None)
    assert await find_link_code(session, code_hash=_hash("bob")) is not None


async def test_a_code_is_used_once_and_never_after_expiry(session: AsyncSession) -> None:
    ann = await _user(session, "slack", "ann")
    code = await add_link_code(session, user_id=ann.id, code_hash=_hash("c"), expires_at=NOW)
    assert await use_link_code(session, code_id=code.id, now=NOW) is False  # expires_at is exclusive
    assert await use_link_code(session, code_id=code.id, now=NOW - dt.timedelta(seconds=1)) is True
    assert await use_link_code(session, code_id=code.id, now=NOW - dt.timedelta(seconds=1)) is False
    await session.commit()
    stored = await find_link_code(session, code_hash=_hash("c"))
    assert stored is not None and stored.used_at == NOW - dt.timedelta(seconds=1)


async def test_concurrent_uses_of_one_code_have_one_winner(session_factory: async_sessionmaker[AsyncSession]) -> None:
    async with session_factory() as session:
        ann = await _user(session, "slack", "ann")
        code = await add_link_code(session, user_id=ann.id, code_hash=_hash("c"), expires_at=NOW)
        await session.commit()
    barrier = asyncio.Barrier(5)

    async def use() -> bool:
        async with session_factory() as session:
            await barrier.wait()
            used = await use_link_code(session, code_id=code.id, now=NOW - dt.timedelta(minutes=1))
            await session.commit()
            return used

    assert sorted(await asyncio.gather(*(use() for _ in range(5)))) == [False] * 4 + [True]


async def test_used_and_expired_codes_are_pruned(session: AsyncSession) -> None:
    users = [await _user(session, "slack", name) for name in ("a", "b", "c")]
    used = await add_link_code(session, user_id=users[0].id, code_hash=_hash("used"), expires_at=NOW)
    await use_link_code(session, code_id=used.id, now=NOW - dt.timedelta(minutes=1))
    await add_link_code(session, user_id=users[1].id, code_hash=_hash("expired"), expires_at=NOW)
    await add_link_code(session, user_id=users[2].id, code_hash=_hash("live"), expires_at=NOW + dt.timedelta(minutes=1))
    await session.commit()

    assert await prune_link_codes(session, now=NOW) == 2
    assert (await session.scalars(select(LinkCode.code_hash))).all() == [_hash("live")]


async def test_merge_moves_everything_to_the_target(session: AsyncSession) -> None:
    target = await _user(session, "discord", "ann", "G1")
    source = await _user(session, "slack", "ann-s", "T1")
    bystander = await _user(session, "console", "carl")
    await _say(session, bystander, "discord:dm", "carl says")
    await set_preference(session, user_id=bystander.id, name="temperature", value=1.0)
    await add_usage(session, user_id=bystander.id, day=TODAY, tokens=3)
    source_other = await get_or_create_user(
        session, platform="discord", workspace_id="G2", platform_user_id="ann-2", display_name="x"
    )
    await merge_users(session, source_user_id=source_other.id, target_user_id=source.id)  # source has 2 accounts
    await _say(session, target, "discord:dm", "target says")
    kept_active = await _say(session, source, "slack:dm", "source says")
    clashing = await _say(session, source, "discord:dm", "source in the same place")
    await set_preference(session, user_id=target.id, name="temperature", value=0.1)
    await set_preference(session, user_id=source.id, name="temperature", value=1.9)
    await set_preference(session, user_id=source.id, name="persona", value="Source persona.")
    await add_usage(session, user_id=target.id, day=TODAY, tokens=10)
    await add_usage(session, user_id=source.id, day=TODAY, tokens=5)
    await add_usage(session, user_id=source.id, day=TODAY - dt.timedelta(days=1), tokens=7)
    await add_link_code(session, user_id=source.id, code_hash=_hash("source"), expires_at=NOW)
    source.banned = True
    await session.commit()

    bystander_before = await export_user_data(session, user_id=bystander.id)

    moved = await merge_users(session, source_user_id=source.id, target_user_id=target.id)
    await session.commit()
    session.expunge_all()

    assert await export_user_data(session, user_id=bystander.id) == bystander_before

    assert {(i.platform, i.platform_user_id) for i in moved} == {("slack", "ann-s"), ("discord", "ann-2")}
    assert {i.user_id for i in moved} == {target.id}
    assert len(await identities_of(session, user_id=target.id)) == 3
    assert await session.get(User, source.id) is None
    history = [m.text for m in await recent_history(session, user_id=target.id, limit=10)]
    assert history == ["target says", "source says", "source in the same place"]
    conversations = {c.id: c for c in await session.scalars(select(Conversation))}
    assert conversations[kept_active.id].active and not conversations[clashing.id].active
    settings = await get_user_settings(session, user_id=target.id)
    assert settings is not None and (settings.temperature, settings.persona) == (0.1, "Source persona.")
    assert await usage_for(session, user_id=target.id, day=TODAY) == 15
    assert await usage_for(session, user_id=target.id, day=TODAY - dt.timedelta(days=1)) == 7
    assert (await session.get_one(User, target.id)).banned
    assert await find_link_code(session, code_hash=_hash("source")) is None
    events = (await session.scalars(select(IdentityEvent).order_by(IdentityEvent.id))).all()
    # The source's own earlier link came along; each moved account got a new record.
    assert [(e.user_id, e.action) for e in events] == [(target.id, "link")] * 3
    assert await session.scalar(select(func.count()).select_from(User)) == 2  # target and bystander


async def test_merging_into_itself_is_refused(session: AsyncSession) -> None:
    ann = await _user(session, "slack", "ann")
    with pytest.raises(ValueError):
        await merge_users(session, source_user_id=ann.id, target_user_id=ann.id)


async def test_detach_gives_the_account_a_fresh_user(session: AsyncSession) -> None:
    ann = await _user(session, "discord", "ann", "G1")
    other = await _user(session, "slack", "ann-s", "T1")
    await merge_users(session, source_user_id=other.id, target_user_id=ann.id)
    await _say(session, ann, "discord:dm", "hello")
    await set_preference(session, user_id=ann.id, name="persona", value="Mine.")
    await add_usage(session, user_id=ann.id, day=TODAY, tokens=30)
    await add_usage(session, user_id=ann.id, day=TODAY - dt.timedelta(days=1), tokens=99)
    ann.banned = True
    await session.commit()
    identity = await find_identity(session, platform="slack", workspace_id="T1", platform_user_id="ann-s")
    assert identity is not None and identity.user_id == ann.id

    fresh = await detach_identity(session, identity_id=identity.id, today=TODAY)
    await session.commit()

    assert fresh.id != ann.id and fresh.banned and fresh.display_name == "ann-s"
    assert [i.id for i in await identities_of(session, user_id=fresh.id)] == [identity.id]
    assert len(await identities_of(session, user_id=ann.id)) == 1
    assert await recent_history(session, user_id=fresh.id, limit=10) == []
    assert [m.text for m in await recent_history(session, user_id=ann.id, limit=10)] == ["hello"]
    assert await get_user_settings(session, user_id=fresh.id) is None
    assert await usage_for(session, user_id=fresh.id, day=TODAY) == 30
    assert await usage_for(session, user_id=fresh.id, day=TODAY - dt.timedelta(days=1)) == 0
    last = await session.scalar(select(IdentityEvent).order_by(IdentityEvent.id.desc()))
    assert last is not None and (last.user_id, last.identity_id, last.action) == (ann.id, identity.id, "unlink")


async def test_a_users_only_account_cannot_be_detached(session: AsyncSession) -> None:
    ann = await _user(session, "slack", "ann")
    identity = await find_identity(session, platform="slack", workspace_id="", platform_user_id="ann")
    assert identity is not None and identity.user_id == ann.id
    with pytest.raises(ValueError, match="only account"):
        await detach_identity(session, identity_id=identity.id, today=TODAY)


async def test_find_identity_of_an_unknown_account(session: AsyncSession) -> None:
    assert await find_identity(session, platform="slack", workspace_id="T1", platform_user_id="nobody") is None


async def test_concurrent_cross_links_do_not_deadlock(session_factory: async_sessionmaker[AsyncSession]) -> None:
    """Ann joins Bob while Bob joins Ann: one wins, the other finds its user gone."""
    async with session_factory() as session:
        ann, bob = await _user(session, "slack", "ann"), await _user(session, "discord", "bob")
        await session.commit()

    async def merge(source: int, target: int) -> str:
        async with session_factory() as session:
            try:
                await merge_users(session, source_user_id=source, target_user_id=target)
            except LookupError:
                return "gone"
            await session.commit()
            return "merged"

    results = await asyncio.wait_for(asyncio.gather(merge(ann.id, bob.id), merge(bob.id, ann.id)), timeout=20)
    assert sorted(results) == ["gone", "merged"]
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1
