"""Repository functions against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import DISPLAY_NAME_LENGTH, Conversation, Identity, Message, User
from storage.repository import (
    LAST_SEEN_RESOLUTION,
    active_history,
    add_message,
    count_messages,
    get_active_conversation,
    get_or_create_user,
    recent_messages,
    start_new_conversation,
    update_message,
)

ACCOUNT = {"platform": "discord", "workspace_id": "G1", "platform_user_id": "U1"}


async def _count(session: AsyncSession, model: type) -> int:
    return await session.scalar(select(func.count()).select_from(model)) or 0


async def _new_user(session: AsyncSession, platform_user_id: str = "U1") -> User:
    user = await get_or_create_user(
        session, platform="discord", workspace_id="G1", platform_user_id=platform_user_id, display_name="Ann"
    )
    await session.commit()
    return user


async def test_first_contact_creates_user_and_identity(session: AsyncSession) -> None:
    user = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
    await session.commit()

    assert user.id is not None
    assert (user.display_name, user.role, user.banned) == ("Ann", "user", False)
    identity = await session.scalar(select(Identity))
    assert identity is not None
    assert (identity.user_id, identity.platform, identity.workspace_id, identity.platform_user_id) == (
        user.id,
        "discord",
        "G1",
        "U1",
    )


async def test_later_contact_returns_same_user_and_refreshes_it(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        first = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
        await session.commit()
    async with session_factory() as session:
        again = await get_or_create_user(session, **ACCOUNT, display_name="Annie")
        await session.commit()
    async with session_factory() as session:
        identity = await session.scalar(select(Identity))
        users = await _count(session, User)

    assert again.id == first.id
    assert users == 1
    assert identity is not None and identity.display_name == "Annie"
    assert again.last_seen_at >= first.last_seen_at



async def test_last_seen_is_rewritten_at_most_once_a_minute(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        user = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
        await session.commit()
    first_seen = user.last_seen_at
    async with session_factory() as session:
        soon = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
        await session.commit()
    assert soon.last_seen_at == first_seen

    async with session_factory() as session:
        stored = await session.get_one(User, user.id)
        stored.last_seen_at = first_seen - LAST_SEEN_RESOLUTION
        await session.commit()
    async with session_factory() as session:
        later = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
        await session.commit()
    assert later.last_seen_at > first_seen
async def test_accounts_differ_by_platform_workspace_and_user(session: AsyncSession) -> None:
    keys = [
        ("discord", "G1", "U1"),
        ("discord", "G2", "U1"),
        ("discord", "G1", "U2"),
        ("slack", "G1", "U1"),
        ("console", "", "U1"),
    ]
    ids = set()
    for platform, workspace_id, platform_user_id in keys:
        user = await get_or_create_user(
            session, platform=platform, workspace_id=workspace_id, platform_user_id=platform_user_id, display_name="x"
        )
        ids.add(user.id)
    await session.commit()
    assert len(ids) == len(keys)


async def test_unknown_platform_is_refused(session: AsyncSession) -> None:
    with pytest.raises(ValueError, match="platform"):
        await get_or_create_user(session, platform="irc", workspace_id="", platform_user_id="u", display_name="x")


async def test_concurrent_first_contacts_create_one_user(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    callers = 20
    barrier = asyncio.Barrier(callers)

    async def first_message(n: int) -> int:
        async with session_factory() as session:
            await barrier.wait()
            user = await get_or_create_user(session, **ACCOUNT, display_name=f"Ann {n}")
            await session.commit()
            return user.id

    ids = await asyncio.gather(*(first_message(n) for n in range(callers)))

    assert len(set(ids)) == 1
    async with session_factory() as session:
        assert await _count(session, User) == 1
        assert await _count(session, Identity) == 1


async def test_racing_first_contact_waits_for_the_winner(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The loser of the race must get the winner's user, not a second one or an error."""

    async def loser() -> int:
        async with session_factory() as session:
            user = await get_or_create_user(session, **ACCOUNT, display_name="Ann")
            await session.commit()
            return user.id

    async with session_factory() as winner_session:
        winner = await get_or_create_user(winner_session, **ACCOUNT, display_name="Ann")
        racing = asyncio.create_task(loser())
        await asyncio.sleep(0.3)
        # Blocked: on PostgreSQL by the uncommitted identity, on SQLite by the write lock.
        assert not racing.done()
        await winner_session.commit()
    assert await asyncio.wait_for(racing, timeout=10) == winner.id
    async with session_factory() as session:
        assert await _count(session, User) == 1


async def test_active_conversation_is_created_once_and_reused(session: AsyncSession) -> None:
    user = await _new_user(session)
    first = await get_active_conversation(session, user_id=user.id, platform="discord", place="discord:G1:C1", is_dm=False)
    again = await get_active_conversation(session, user_id=user.id, platform="discord", place="discord:G1:C1", is_dm=False)
    elsewhere = await get_active_conversation(session, user_id=user.id, platform="discord", place="discord:G1:C2", is_dm=False)
    await session.commit()

    assert first.id == again.id
    assert elsewhere.id != first.id
    assert first.active and not first.is_dm and first.platform == "discord"


async def test_start_new_conversation_deactivates_the_old_one(session: AsyncSession) -> None:
    user = await _new_user(session)
    old = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    new = await start_new_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    await session.commit()

    assert new.id != old.id
    assert (old.active, new.active) == (False, True)
    current = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    assert current.id == new.id


async def test_start_new_conversation_without_an_old_one(session: AsyncSession) -> None:
    user = await _new_user(session)
    new = await start_new_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    await session.commit()
    assert new.active


async def test_concurrent_get_active_conversation_creates_one(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        user = await _new_user(session)
    callers = 10
    barrier = asyncio.Barrier(callers)

    async def one() -> int:
        async with session_factory() as session:
            await barrier.wait()
            conversation = await get_active_conversation(
                session, user_id=user.id, platform="slack", place="slack:T1:C1", is_dm=False
            )
            await session.commit()
            return conversation.id

    ids = await asyncio.gather(*(one() for _ in range(callers)))
    assert len(set(ids)) == 1
    async with session_factory() as session:
        assert await _count(session, Conversation) == 1


async def test_concurrent_resets_leave_one_active_conversation(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    async with session_factory() as session:
        user = await _new_user(session)
        await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
        await session.commit()

    async def reset() -> int:
        async with session_factory() as session:
            conversation = await start_new_conversation(
                session, user_id=user.id, platform="console", place="console", is_dm=True
            )
            await session.commit()
            return conversation.id

    await asyncio.gather(*(reset() for _ in range(5)))
    async with session_factory() as session:
        active = await session.scalar(
            select(func.count()).select_from(Conversation).where(Conversation.active)
        )
    assert active == 1


async def test_messages_come_back_newest_last(session: AsyncSession) -> None:
    user = await _new_user(session)
    conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    for n in range(5):
        await add_message(session, conversation_id=conversation.id, role="user" if n % 2 == 0 else "bot", text=f"m{n}", token_count=n)
    await session.commit()

    last_three = await recent_messages(session, conversation_id=conversation.id, limit=3)
    assert [m.text for m in last_three] == ["m2", "m3", "m4"]
    everything = await recent_messages(session, conversation_id=conversation.id, limit=100)
    assert [m.text for m in everything] == [f"m{n}" for n in range(5)]
    assert await recent_messages(session, conversation_id=conversation.id + 1, limit=3) == []


async def test_active_history_starts_a_conversation_and_reads_only_the_active_one(session: AsyncSession) -> None:
    user = await _new_user(session)
    where = {"user_id": user.id, "platform": "console", "place": "console", "is_dm": True}
    first_id, turns = await active_history(session, **where, limit=10)
    assert turns == []
    assert (await active_history(session, **where, limit=10))[0] == first_id  # empty, still the same one
    for n in range(5):
        await add_message(session, conversation_id=first_id, role="user" if n % 2 == 0 else "bot", text=f"m{n}", token_count=n)
    await add_message(session, conversation_id=first_id, role="bot", text="m5", token_count=0, status="failed")
    other_place = await get_active_conversation(session, **{**where, "place": "elsewhere"})
    await add_message(session, conversation_id=other_place.id, role="user", text="not here", token_count=1)

    same_id, last_three = await active_history(session, **where, limit=3)
    assert same_id == first_id
    assert [(t.role, t.text, t.status) for t in last_three] == [
        ("bot", "m3", "ok"),
        ("user", "m4", "ok"),
        ("bot", "m5", "failed"),
    ]
    assert [t.text for t in (await active_history(session, **where, limit=100))[1]] == [f"m{n}" for n in range(6)]
    assert (await active_history(session, **where, limit=0)) == (first_id, [])

    new = await start_new_conversation(session, **where)
    assert await active_history(session, **where, limit=10) == (new.id, [])


async def test_bot_message_records_generation_and_can_be_finished(session: AsyncSession) -> None:
    user = await _new_user(session)
    conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    message = await add_message(
        session, conversation_id=conversation.id, role="bot", text="Hel", token_count=1, model_name="gpt-small", status="cancelled"
    )
    await update_message(session, message_id=message.id, text="Hello!", token_count=3, generation_ms=42, status="ok")
    await session.commit()
    session.expunge_all()

    stored = await session.get_one(Message, message.id)
    assert (stored.text, stored.token_count, stored.model_name, stored.generation_ms, stored.status) == (
        "Hello!",
        3,
        "gpt-small",
        42,
        "ok",
    )
    assert stored.created_at.tzinfo is not None and stored.created_at.utcoffset() == dt.timedelta(0)


async def test_update_of_a_missing_message_raises(session: AsyncSession) -> None:
    with pytest.raises(LookupError):
        await update_message(session, message_id=12345, status="failed")


@pytest.mark.parametrize(("field", "value"), [("role", "system"), ("status", "pending")])
async def test_invalid_role_or_status_is_refused(session: AsyncSession, field: str, value: str) -> None:
    user = await _new_user(session)
    conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    arguments = {"role": "user", "status": "ok", field: value}
    with pytest.raises(ValueError, match=field):
        await add_message(session, conversation_id=conversation.id, text="hi", token_count=1, **arguments)


async def test_count_messages_in_all_or_per_user(session: AsyncSession) -> None:
    ann, bob = await _new_user(session, "ann"), await _new_user(session, "bob")
    for user, count in ((ann, 3), (bob, 2)):
        conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
        for _ in range(count):
            await add_message(session, conversation_id=conversation.id, role="user", text="hi", token_count=1)
    await session.commit()

    assert await count_messages(session) == 5
    assert await count_messages(session, user_id=ann.id) == 3
    assert await count_messages(session, user_id=bob.id) == 2
    assert await count_messages(session, user_id=bob.id + 100) == 0


async def test_deleting_a_user_deletes_their_data(session: AsyncSession) -> None:
    ann, bob = await _new_user(session, "ann"), await _new_user(session, "bob")
    for user in (ann, bob):
        conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
        await add_message(session, conversation_id=conversation.id, role="user", text="hi", token_count=1)
    await session.commit()

    await session.execute(delete(User).where(User.id == ann.id))
    await session.commit()

    assert await _count(session, User) == 1
    assert await _count(session, Identity) == 1
    assert await _count(session, Conversation) == 1
    assert await count_messages(session) == 1
    assert await count_messages(session, user_id=bob.id) == 1


async def test_timestamps_are_utc_and_aware(session_factory: async_sessionmaker[AsyncSession]) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    async with session_factory() as session:
        user = await _new_user(session)
    async with session_factory() as session:
        stored = await session.get_one(User, user.id)
    assert stored.created_at.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= stored.created_at <= dt.datetime.now(dt.timezone.utc)


async def test_naive_datetimes_are_refused(session: AsyncSession) -> None:
    user = await _new_user(session)
    user.last_seen_at = dt.datetime(2024, 1, 1)
    with pytest.raises(Exception, match="naive datetime"):
        await session.flush()


async def test_long_or_nul_display_names_are_stored_on_every_backend(session: AsyncSession) -> None:
    user = await get_or_create_user(session, **ACCOUNT, display_name="\x00" + "é" * 300)
    await session.commit()
    session.expunge_all()

    stored = await session.get_one(User, user.id)
    assert stored.display_name == "é" * DISPLAY_NAME_LENGTH
