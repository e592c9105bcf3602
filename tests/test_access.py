"""Access rules: admins, allow and deny lists, bans and daily quotas."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from bot.access import Access, Decision, Quota, Refusal, quota_for, set_ban
from bot.accounts import Account, Ref, parse_ref, parse_refs
from bot.config import Settings
from bot.identity import user_for
from bot.messages import Incoming
from storage.linking import merge_users
from storage.models import User
from storage.usage import add_usage

ADMIN = Account("discord", "G1", "1234")
DAY = dt.date(2025, 3, 14)


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(_env_file=None, model_path=tmp_path, **fields)


def _msg(
    platform: str = "discord", user: str = "42", workspace: str = "G1", channel: str = "C1", dm: bool = False
) -> Incoming:
    return Incoming(
        platform, user, user, "hi", channel_id=channel, workspace_id=workspace, is_dm=dm
    )


def test_references_parse_with_or_without_a_workspace() -> None:
    assert parse_ref("discord:1234") == Ref("discord", None, "1234")
    assert parse_ref("slack:T01ABC/U02DEF") == Ref("slack", "T01ABC", "U02DEF")
    assert parse_refs(" discord:1 ,, slack:T1/U2 ,") == (Ref("discord", None, "1"), Ref("slack", "T1", "U2"))
    assert parse_refs("slack:T1", scoped=False) == (Ref("slack", None, "T1"),)
    assert str(Account("slack", "T1", "U2")) == "slack:T1/U2" and str(Account("console", "", "me")) == "console:me"


def test_settings_keep_lists_in_one_canonical_form(tmp_path: Path) -> None:
    settings = _settings(tmp_path, admins=" discord:1234 , slack:T01ABC/U02DEF,", deny_workspaces="slack:T9 ")
    assert settings.admins == "discord:1234,slack:T01ABC/U02DEF"
    assert settings.deny_workspaces == "slack:T9"


def test_admins_are_named_by_account_with_or_without_workspace(tmp_path: Path) -> None:
    access = Access(_settings(tmp_path, admins="discord:1234,slack:T01ABC/U02DEF"))
    assert access.is_admin(Account("discord", "G1", "1234"))
    assert access.is_admin(Account("discord", "", "1234"))  # a DM, outside any guild
    assert access.is_admin(Account("slack", "T01ABC", "U02DEF"))
    assert not access.is_admin(Account("slack", "T99", "U02DEF"))
    assert not access.is_admin(Account("slack", "T01ABC", "1234"))
    assert not access.is_admin(Account("discord", "G1", "12345"))


def test_everyone_is_allowed_by_default(tmp_path: Path) -> None:
    access = Access(_settings(tmp_path))
    assert access.check(_msg(), banned=False) == Decision()
    assert access.check(_msg(), banned=False).allowed


@pytest.mark.parametrize(
    ("fields", "msg", "refusal"),
    [
        ({}, _msg(), Refusal.BANNED),  # banned=True below
        ({"deny_users": "discord:42"}, _msg(), Refusal.USER),
        ({"allow_users": "discord:7"}, _msg(), Refusal.USER),
        ({"allow_users": "slack:T1/42"}, _msg(), Refusal.USER),
        ({"deny_workspaces": "discord:G1"}, _msg(), Refusal.WORKSPACE),
        ({"allow_workspaces": "discord:G2"}, _msg(), Refusal.WORKSPACE),
        ({"allow_workspaces": "slack:G1"}, _msg(), Refusal.WORKSPACE),
        ({"deny_channels": "discord:C1"}, _msg(), Refusal.CHANNEL),
        ({"deny_channels": "discord:G1/C1"}, _msg(), Refusal.CHANNEL),
        ({"allow_channels": "discord:C2"}, _msg(), Refusal.CHANNEL),
        ({"allow_channels": "discord:G2/C1"}, _msg(), Refusal.CHANNEL),
        ({"allow_workspaces": "slack:T1"}, _msg("slack", "U1", "T1", dm=True), None),
        ({"allow_users": "discord:42", "deny_users": "discord:G1/42"}, _msg(), Refusal.USER),  # deny wins
        ({"allow_users": "discord:42"}, _msg(), None),
        ({"allow_channels": "discord:C1", "allow_workspaces": "discord:G1"}, _msg(), None),
        # DMs are in no channel; a Discord DM is in no guild.
        ({"allow_channels": "discord:C2"}, _msg(dm=True), None),
        ({"allow_workspaces": "discord:G2"}, _msg(workspace="", dm=True), None),
        ({"allow_workspaces": "slack:T2"}, _msg("slack", "U1", "T1", dm=True), Refusal.WORKSPACE),
    ],
)
def test_lists_and_bans(tmp_path: Path, fields: dict[str, str], msg: Incoming, refusal: Refusal | None) -> None:
    decision = Access(_settings(tmp_path, **fields)).check(msg, banned=refusal == Refusal.BANNED)
    assert decision.refusal == refusal
    assert decision.allowed == (refusal is None)
    assert bool(decision.message) == (refusal is not None)


def test_admins_are_never_refused(tmp_path: Path) -> None:
    access = Access(
        _settings(
            tmp_path,
            admins="discord:42",
            deny_users="discord:42",
            deny_channels="discord:C1",
            deny_workspaces="discord:G1",
        )
    )
    assert access.check(_msg(), banned=True).allowed


def test_refusal_messages_say_why(tmp_path: Path) -> None:
    access = Access(_settings(tmp_path, deny_channels="discord:C1"))
    assert access.check(_msg(), banned=True).message == "You have been banned from using this bot."
    assert access.check(_msg(), banned=False).message == "I am not allowed to answer in this channel."


@pytest.fixture
def access(tmp_path: Path) -> Access:
    return Access(_settings(tmp_path, admins="discord:1234,slack:T1/UADMIN"))


async def _user(session: AsyncSession, account: Account) -> User:
    user = await user_for(session, account=account, display_name=account.user_id)
    await session.commit()
    return user


async def _banned(session: AsyncSession, account: Account) -> bool:
    session.expunge_all()
    return (await user_for(session, account=account, display_name=account.user_id)).banned


async def test_admin_bans_and_unbans_a_user_with_their_linked_accounts(session: AsyncSession, access: Access) -> None:
    bob, bob_slack = Account("discord", "G1", "42"), Account("slack", "T1", "U42")
    carl = Account("discord", "G1", "43")
    owner, other = await _user(session, bob), await _user(session, bob_slack)
    await merge_users(session, source_user_id=other.id, target_user_id=owner.id)
    await _user(session, carl)

    message = await set_ban(session, access=access, actor=ADMIN, target="discord:42", banned=True)
    await session.commit()
    assert message == "Banned discord:42 (1 user, with their linked accounts)."
    assert await _banned(session, bob) and await _banned(session, bob_slack)
    assert not await _banned(session, carl)
    assert not access.check(_msg(user="42"), banned=await _banned(session, bob)).allowed

    message = await set_ban(session, access=access, actor=ADMIN, target=" slack:T1/U42 ", banned=False)
    await session.commit()
    assert message == "Unbanned slack:T1/U42 (1 user, with their linked accounts)."
    assert not await _banned(session, bob)


async def test_a_ban_without_workspace_reaches_every_workspace(session: AsyncSession, access: Access) -> None:
    await _user(session, Account("discord", "G1", "42"))
    await _user(session, Account("discord", "G2", "42"))
    message = await set_ban(session, access=access, actor=ADMIN, target="discord:42", banned=True)
    assert message == "Banned discord:42 (2 users, with their linked accounts)."
    elsewhere = await set_ban(session, access=access, actor=ADMIN, target="discord:G3/42", banned=True)
    assert elsewhere.startswith("No one known as discord:G3/42")


@pytest.mark.parametrize(
    ("actor", "target", "expected"),
    [
        (Account("discord", "G1", "42"), "discord:43", "Only admins can ban people."),
        (ADMIN, "nonsense", "Cannot ban that: 'nonsense' is not platform:id"),
        (ADMIN, "discord:999", "No one known as discord:999 has written to me yet."),
        (ADMIN, "slack:UADMIN", "slack:UADMIN is an admin (BOT_ADMINS); admins cannot be banned."),
    ],
)
async def test_bans_that_cannot_be_done_say_why(
    session: AsyncSession, access: Access, actor: Account, target: str, expected: str
) -> None:
    await _user(session, Account("discord", "G1", "43"))
    await _user(session, Account("slack", "T1", "UADMIN"))
    message = await set_ban(session, access=access, actor=actor, target=target, banned=True)
    assert message.startswith(expected)
    await session.commit()
    assert not await _banned(session, Account("discord", "G1", "43"))
    assert not await _banned(session, Account("slack", "T1", "UADMIN"))


def test_quota_messages() -> None:
    assert Quota(used=1200, limit=0).message == "You have used 1,200 tokens today; there is no daily limit."
    assert Quota(used=1200, limit=0).remaining is None and not Quota(used=10**9, limit=0).exceeded
    partial = Quota(used=1200, limit=5000)
    assert (partial.remaining, partial.exceeded) == (3800, False)
    assert partial.message == "You have used 1,200 of your 5,000 tokens today (the day ends at midnight UTC)."
    spent = Quota(used=5100, limit=5000)
    assert (spent.remaining, spent.exceeded) == (0, True)
    assert spent.message.startswith("You have used all 5,000 of your tokens for today.")


async def test_quota_counts_the_users_tokens_today(session: AsyncSession, tmp_path: Path) -> None:
    user = await _user(session, Account("slack", "T1", "U1"))
    await add_usage(session, user_id=user.id, day=DAY, tokens=700)
    await add_usage(session, user_id=user.id, day=DAY - dt.timedelta(days=1), tokens=900)
    settings = _settings(tmp_path, daily_token_quota=1000)
    assert await quota_for(session, settings=settings, user_id=user.id, today=DAY) == Quota(used=700, limit=1000)
    await add_usage(session, user_id=user.id, day=DAY, tokens=300)
    assert (await quota_for(session, settings=settings, user_id=user.id, today=DAY)).exceeded
