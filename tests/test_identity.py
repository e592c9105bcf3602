"""Account linking end to end on real databases: codes, expiry, single use, throttling, merging, unlinking."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.accounts import Account
from bot.config import Settings
from bot.identity import (
    AccountLinking,
    LinkResult,
    LinkStatus,
    WrongCodeThrottle,
    hash_code,
    new_code,
    normalized_code,
    user_for,
)
from storage.db import make_engine, make_session_factory
from storage.models import IdentityEvent, LinkCode
from storage.privacy import export_user_data, recent_history
from storage.repository import add_message, get_active_conversation
from storage.user_settings import preferences_for, set_preference

DISCORD = Account("discord", "G1", "111")
SLACK = Account("slack", "T1", "U1")
CONSOLE = Account("console", "", "me")
STRANGER = Account("discord", "G1", "666")
CODE = re.compile(r"\b[A-Z2-9]{5}-[A-Z2-9]{5}\b")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = dt.datetime(2025, 3, 14, 12, 0, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, model_path=tmp_path, link_code_ttl_minutes=10)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def linking(settings: Settings, clock: Clock) -> AccountLinking:
    return AccountLinking(settings, throttle=WrongCodeThrottle(limit=3, window=dt.timedelta(minutes=15)), clock=clock)


async def _create(linking: AccountLinking, factory: async_sessionmaker[AsyncSession], account: Account) -> str:
    async with factory() as session, session.begin():
        result = await linking.create_code(session, account=account, display_name=account.user_id)
    assert result.status == LinkStatus.CODE_CREATED and result.ok
    found = CODE.search(result.message)
    assert found is not None, result.message
    return found.group()


async def _redeem(
    linking: AccountLinking, factory: async_sessionmaker[AsyncSession], account: Account, code: str
) -> LinkResult:
    async with factory() as session, session.begin():
        return await linking.redeem(session, account=account, display_name=account.user_id, code=code)


async def _user_id(factory: async_sessionmaker[AsyncSession], account: Account) -> int:
    async with factory() as session, session.begin():
        return (await user_for(session, account=account, display_name=account.user_id)).id


async def _say(factory: async_sessionmaker[AsyncSession], account: Account, text: str) -> None:
    async with factory() as session, session.begin():
        user = await user_for(session, account=account, display_name=account.user_id)
        conversation = await get_active_conversation(
            session, user_id=user.id, platform=account.platform, place=f"{account.platform}:dm", is_dm=True
        )
        await add_message(session, conversation_id=conversation.id, role="user", text=text, token_count=1)


def test_codes_are_random_and_typed_forgivingly() -> None:
    codes = {new_code() for _ in range(200)}
    assert len(codes) == 200 and all(CODE.fullmatch(c) for c in codes)
    code = next(iter(codes))
    assert normalized_code(f"  {code.lower()} ") == normalized_code(code.replace("-", " ")) == code.replace("-", "")
    assert hash_code(code.lower()) == hashlib.sha256(code.replace("-", "").encode()).hexdigest()
    for bad in ("", "hello", "ABCDE-FGHJ", "ABCDE-FGHJ0", "ABCDE-FGHJKL"):
        assert normalized_code(bad) is None


async def test_link_joins_the_account_and_its_history_to_the_code_owner(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking, settings: Settings
) -> None:
    await _say(session_factory, DISCORD, "said on discord")
    await _say(session_factory, SLACK, "said on slack")
    await _say(session_factory, STRANGER, "a stranger's words")
    owner, stranger = await _user_id(session_factory, DISCORD), await _user_id(session_factory, STRANGER)
    async with session_factory() as session, session.begin():
        await set_preference(session, user_id=owner, name="persona", value="Owner's persona.")
        stranger_before = await export_user_data(session, user_id=stranger)

    code = await _create(linking, session_factory, DISCORD)
    result = await _redeem(linking, session_factory, SLACK, code)

    assert result.status == LinkStatus.LINKED and result.ok
    assert "Linked" in result.message and "Discord account" in result.message
    assert await _user_id(session_factory, SLACK) == owner
    async with session_factory() as session:
        history = [m.text for m in await recent_history(session, user_id=owner, limit=10)]
        assert history == ["said on discord", "said on slack"]
        assert (await preferences_for(session, user_id=owner, defaults=settings)).persona == "Owner's persona."
        events = (await session.scalars(select(IdentityEvent))).all()
        assert [(e.user_id, e.action) for e in events] == [(owner, "link")]
        assert await export_user_data(session, user_id=stranger) == stranger_before


async def test_only_the_hash_of_a_code_is_stored(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    code = await _create(linking, session_factory, DISCORD)
    async with session_factory() as session:
        row = (await session.scalars(select(LinkCode))).one()
    assert row.code_hash == hashlib.sha256(code.replace("-", "").encode()).hexdigest()
    stored = " ".join(str(getattr(row, c.name)) for c in LinkCode.__table__.columns)
    assert code.replace("-", "") not in stored and code not in stored


async def test_a_code_expires(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking, clock: Clock
) -> None:
    code = await _create(linking, session_factory, DISCORD)
    clock.advance(minutes=10)
    result = await _redeem(linking, session_factory, SLACK, code)
    assert result.status == LinkStatus.EXPIRED_CODE
    assert result.message == (
        "That link code has expired (codes last 10 minutes). Send /link on your other account for a new one."
    )
    assert await _user_id(session_factory, SLACK) != await _user_id(session_factory, DISCORD)


async def test_a_code_works_until_it_expires(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking, clock: Clock
) -> None:
    code = await _create(linking, session_factory, DISCORD)
    clock.advance(minutes=9, seconds=59)
    assert (await _redeem(linking, session_factory, SLACK, code.lower().replace("-", " "))).status == LinkStatus.LINKED


async def test_a_code_works_once(session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking) -> None:
    code = await _create(linking, session_factory, DISCORD)
    assert (await _redeem(linking, session_factory, SLACK, code)).status == LinkStatus.LINKED
    again = await _redeem(linking, session_factory, CONSOLE, code)
    assert again.status == LinkStatus.USED_CODE and not again.ok
    assert "already used" in again.message
    assert await _user_id(session_factory, CONSOLE) != await _user_id(session_factory, DISCORD)


async def test_a_newer_code_replaces_the_older(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    old = await _create(linking, session_factory, DISCORD)
    new = await _create(linking, session_factory, DISCORD)
    assert (await _redeem(linking, session_factory, SLACK, old)).status == LinkStatus.WRONG_CODE
    assert (await _redeem(linking, session_factory, SLACK, new)).status == LinkStatus.LINKED


@pytest.mark.parametrize("typed", ["ZZZZZ-ZZZZZ", "hello", ""])
async def test_a_wrong_code_gets_a_clear_message(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking, typed: str
) -> None:
    await _create(linking, session_factory, DISCORD)
    result = await _redeem(linking, session_factory, SLACK, typed)
    assert result.status == LinkStatus.WRONG_CODE
    assert result.message == (
        "That link code is not right. Check it, or send /link on your other account for a new one."
    )


async def test_own_code_is_already_linked_and_not_spent(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    code = await _create(linking, session_factory, DISCORD)
    result = await _redeem(linking, session_factory, DISCORD, code)
    assert result.status == LinkStatus.ALREADY_LINKED and "already linked" in result.message
    assert (await _redeem(linking, session_factory, SLACK, code)).status == LinkStatus.LINKED


async def test_repeated_wrong_codes_are_throttled(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking, clock: Clock
) -> None:
    for minute in range(3):  # the fixture's limit: 3 wrong codes in 15 minutes
        assert (await _redeem(linking, session_factory, SLACK, "AAAAA-AAAAA")).status == LinkStatus.WRONG_CODE
        clock.advance(minutes=1)
    code = await _create(linking, session_factory, DISCORD)

    refused = await _redeem(linking, session_factory, SLACK, code)
    assert refused.status == LinkStatus.THROTTLED
    assert refused.message == "Too many wrong link codes from this account. Try again in 12 minutes."
    # Other accounts are not held back by SLACK's mistakes.
    assert (await _redeem(linking, session_factory, CONSOLE, "AAAAA-AAAAA")).status == LinkStatus.WRONG_CODE

    clock.advance(minutes=12)  # the first wrong code is now 15 minutes old
    code = await _create(linking, session_factory, DISCORD)
    assert (await _redeem(linking, session_factory, SLACK, code)).status == LinkStatus.LINKED


def test_throttle_counts_per_account_and_forgets_old_failures() -> None:
    throttle = WrongCodeThrottle(limit=2, window=dt.timedelta(minutes=10), max_accounts=2)
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    throttle.failed(SLACK, t0)
    assert throttle.wait(SLACK, t0) is None
    throttle.failed(SLACK, t0 + dt.timedelta(minutes=4))
    assert throttle.wait(SLACK, t0 + dt.timedelta(minutes=5)) == dt.timedelta(minutes=5)
    assert throttle.wait(SLACK, t0 + dt.timedelta(minutes=10)) is None
    throttle.succeeded(SLACK)
    throttle.failed(SLACK, t0)
    throttle.failed(SLACK, t0)
    # Bounded: two more accounts push out the least recent one.
    throttle.failed(DISCORD, t0)
    throttle.failed(CONSOLE, t0)
    assert throttle.wait(SLACK, t0) is None


async def test_racing_redemptions_of_one_code_link_once(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    code = await _create(linking, session_factory, DISCORD)
    for account in (SLACK, CONSOLE):
        await _user_id(session_factory, account)
    results = await asyncio.gather(*(_redeem(linking, session_factory, a, code) for a in (SLACK, CONSOLE)))
    assert sorted(r.status.value for r in results) == ["linked", "used_code"]


async def test_unlink_gives_the_account_a_fresh_user(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    await _say(session_factory, DISCORD, "shared history")
    code = await _create(linking, session_factory, DISCORD)
    await _redeem(linking, session_factory, SLACK, code)
    owner = await _user_id(session_factory, DISCORD)

    async with session_factory() as session, session.begin():
        result = await linking.unlink(session, account=SLACK)

    assert result.status == LinkStatus.UNLINKED and "Unlinked" in result.message
    fresh = await _user_id(session_factory, SLACK)
    assert fresh != owner
    async with session_factory() as session:
        assert await recent_history(session, user_id=fresh, limit=10) == []
        assert [m.text for m in await recent_history(session, user_id=owner, limit=10)] == ["shared history"]
        events = (await session.scalars(select(IdentityEvent).order_by(IdentityEvent.id))).all()
        assert [(e.user_id, e.action) for e in events] == [(owner, "link"), (owner, "unlink")]
    async with session_factory() as session, session.begin():
        again = await linking.unlink(session, account=SLACK)
    assert again.status == LinkStatus.NOT_LINKED
    assert again.message == "This account is not linked to any other."


async def test_unlink_of_an_unknown_account(
    session_factory: async_sessionmaker[AsyncSession], linking: AccountLinking
) -> None:
    async with session_factory() as session, session.begin():
        assert (await linking.unlink(session, account=STRANGER)).status == LinkStatus.NOT_LINKED


async def test_codes_never_reach_the_logs(
    db_url: str, linking: AccountLinking, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = make_engine(db_url, echo=True)  # logs every statement with its parameters
    try:
        factory = make_session_factory(engine)
        code = await _create(linking, factory, DISCORD)
        result = await _redeem(linking, factory, SLACK, code)
        logging.getLogger("test").info("result: %r", result)
    finally:
        await engine.dispose()
    assert result.status == LinkStatus.LINKED
    assert hash_code(code) in caplog.text  # the statements were logged, with the hash...
    assert code not in caplog.text and code.replace("-", "") not in caplog.text  # ...but never the code
