"""Who may use the bot: admins (BOT_ADMINS), allow and deny lists for accounts, channels and workspaces, bans, quotas.

The rules, in order: an admin is always allowed; then a banned user, an account in
BOT_DENY_USERS or missing from a non-empty BOT_ALLOW_USERS, a message from a
workspace that the workspace lists keep out, and a message in a channel that the
channel lists keep out are refused. DMs are not in any channel; a DM outside any
workspace (Discord) is governed by the account lists alone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum

from sqlalchemy.ext.asyncio import AsyncSession

from bot.accounts import Account, Ref, parse_ref, parse_refs
from bot.config import Settings
from bot.messages import Incoming
from storage.bans import identities_named, set_banned
from storage.repository import Owner, account_owner
from storage.usage import usage_for


class Refusal(str, Enum):
    BANNED = "banned"
    USER = "user"
    WORKSPACE = "workspace"
    CHANNEL = "channel"


REFUSAL_MESSAGES = {
    Refusal.BANNED: "You have been banned from using this bot.",
    Refusal.USER: "Sorry, you are not allowed to use this bot.",
    Refusal.WORKSPACE: "I am not allowed to answer in this workspace.",
    Refusal.CHANNEL: "I am not allowed to answer in this channel.",
}


@dataclass(frozen=True)
class Decision:
    """Whether a message may be answered; `refusal` says why not, `message` says it to the sender."""

    refusal: Refusal | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    @property
    def message(self) -> str:
        return "" if self.refusal is None else REFUSAL_MESSAGES[self.refusal]


def _listed(refs: tuple[Ref, ...], platform: str, workspace_id: str, id: str) -> bool:
    return any(ref.matches(platform, workspace_id, id) for ref in refs)


def _kept_out(allow: tuple[Ref, ...], deny: tuple[Ref, ...], platform: str, workspace_id: str, id: str) -> bool:
    """Denied, or an allow list exists and does not name it."""
    return _listed(deny, platform, workspace_id, id) or bool(allow) and not _listed(allow, platform, workspace_id, id)


class Access:
    """The access rules of one Settings, parsed once."""

    def __init__(self, settings: Settings) -> None:
        self.admins = parse_refs(settings.admins)
        self.allow_users, self.deny_users = parse_refs(settings.allow_users), parse_refs(settings.deny_users)
        self.allow_channels = parse_refs(settings.allow_channels)
        self.deny_channels = parse_refs(settings.deny_channels)
        self.allow_workspaces = parse_refs(settings.allow_workspaces, scoped=False)
        self.deny_workspaces = parse_refs(settings.deny_workspaces, scoped=False)

    def is_admin(self, account: Account) -> bool:
        """Whether BOT_ADMINS names the account."""
        return _listed(self.admins, account.platform, account.workspace_id, account.user_id)

    def check(self, msg: Incoming, *, banned: bool) -> Decision:
        """May the bot answer `msg`? `banned` is the sender's user's ban (User.banned)."""
        account = Account.of(msg)
        if self.is_admin(account):
            return Decision()
        if banned:
            return Decision(Refusal.BANNED)
        if _kept_out(self.allow_users, self.deny_users, msg.platform, msg.workspace_id, msg.user_id):
            return Decision(Refusal.USER)
        if msg.workspace_id and _kept_out(
            self.allow_workspaces, self.deny_workspaces, msg.platform, "", msg.workspace_id
        ):
            return Decision(Refusal.WORKSPACE)
        if not msg.is_dm and _kept_out(
            self.allow_channels, self.deny_channels, msg.platform, msg.workspace_id, msg.channel_id
        ):
            return Decision(Refusal.CHANNEL)
        return Decision()


async def admitted_user(session: AsyncSession, *, access: Access, msg: Incoming) -> tuple[Owner, Decision]:
    """The sender's user (created on first contact) with their settings, and whether they may be answered
    here. The caller commits."""
    account = Account.of(msg)
    owner = await account_owner(
        session,
        platform=account.platform,
        workspace_id=account.workspace_id,
        platform_user_id=account.user_id,
        display_name=msg.display_name,
    )
    return owner, access.check(msg, banned=owner.user.banned)


async def set_ban(session: AsyncSession, *, access: Access, actor: Account, target: str, banned: bool) -> str:
    """An admin's `ban TARGET` or `unban TARGET` (TARGET as in BOT_ADMINS); the message to show the admin.

    Bans the users behind every matching account, with all their linked accounts.
    The caller commits.
    """
    verb = "ban" if banned else "unban"
    if not access.is_admin(actor):
        return f"Only admins can {verb} people."
    try:
        ref = parse_ref(target.strip())
    except ValueError as exc:
        return f"Cannot {verb} that: {exc}."
    identities = await identities_named(
        session, platform=ref.platform, workspace_id=ref.workspace_id, platform_user_id=ref.id
    )
    if not identities:
        return (
            f"No one known as {ref} has written to me yet. To keep them out before they do, "
            "add them to BOT_DENY_USERS."
        )
    if banned and any(access.is_admin(Account(i.platform, i.workspace_id, i.platform_user_id)) for i in identities):
        return f"{ref} is an admin (BOT_ADMINS); admins cannot be banned."
    user_ids = sorted({i.user_id for i in identities})
    for user_id in user_ids:
        await set_banned(session, user_id=user_id, banned=banned)
    users = f"{len(user_ids)} users" if len(user_ids) > 1 else "1 user"
    return f"{verb.capitalize()}ned {ref} ({users}, with their linked accounts)."


@dataclass(frozen=True)
class Quota:
    """A user's tokens today against BOT_DAILY_TOKEN_QUOTA (0 = unlimited)."""

    used: int
    limit: int

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.used >= self.limit

    @property
    def remaining(self) -> int | None:
        """Tokens left today, None when unlimited."""
        return None if self.limit == 0 else max(self.limit - self.used, 0)

    @property
    def message(self) -> str:
        if self.limit == 0:
            return f"You have used {self.used:,} tokens today; there is no daily limit."
        if self.exceeded:
            return (
                f"You have used all {self.limit:,} of your tokens for today. "
                "The quota starts afresh at midnight UTC."
            )
        return f"You have used {self.used:,} of your {self.limit:,} tokens today (the day ends at midnight UTC)."


async def quota_for(session: AsyncSession, *, settings: Settings, user_id: int, today: dt.date) -> Quota:
    """The user's quota for `today` (a UTC date)."""
    return Quota(used=await usage_for(session, user_id=user_id, day=today), limit=settings.daily_token_quota)
