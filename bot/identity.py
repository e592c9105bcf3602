"""Platform accounts to users, and account linking: one-time codes, redeeming them (throttled), unlinking.

A code is shown once to the account that asked for it and stored only as its SHA-256
hash; it is never logged. What linking and unlinking do to the users' data is
described in storage/linking.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from sqlalchemy.ext.asyncio import AsyncSession

from bot.accounts import Account
from bot.config import Settings
from storage.linking import (
    add_link_code,
    detach_identity,
    find_identity,
    find_link_code,
    identities_of,
    merge_users,
    use_link_code,
)
from storage.models import LinkCode, User, utcnow
from storage.repository import get_or_create_user

# No 0/O or 1/I: people read these codes on one screen and type them on another.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 10  # 50 bits: unguessable within a code's lifetime, given the throttle
PLATFORM_NAMES = {"console": "terminal", "discord": "Discord", "slack": "Slack"}


async def user_for(session: AsyncSession, *, account: Account, display_name: str) -> User:
    """The user behind a platform account, created on first contact. The caller commits."""
    return await get_or_create_user(
        session,
        platform=account.platform,
        workspace_id=account.workspace_id,
        platform_user_id=account.user_id,
        display_name=display_name,
    )


def new_code() -> str:
    """A fresh random code, as shown to people: 'ABCDE-FGHJK'."""
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return f"{code[:5]}-{code[5:]}"


def normalized_code(text: str) -> str | None:
    """The code in what a person typed (any case, spaces and dashes ignored), or None if it cannot be one."""
    code = "".join(text.split()).replace("-", "").upper()
    if len(code) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in code):
        return None
    return code


def hash_code(code: str) -> str:
    """The SHA-256 hex digest that is stored instead of the code."""
    normalized = normalized_code(code)
    if normalized is None:
        raise ValueError("not a link code")
    return hashlib.sha256(normalized.encode("ascii")).hexdigest()


class LinkStatus(str, Enum):
    CODE_CREATED = "code_created"
    LINKED = "linked"
    UNLINKED = "unlinked"
    ALREADY_LINKED = "already_linked"
    NOT_LINKED = "not_linked"
    WRONG_CODE = "wrong_code"
    EXPIRED_CODE = "expired_code"
    USED_CODE = "used_code"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class LinkResult:
    """The outcome of a link or unlink request and the message to show its sender.

    The message of CODE_CREATED holds the code: show it only to the asker (ephemeral).
    """

    status: LinkStatus
    message: str = field(repr=False)  # may hold a code, which must not reach logs

    @property
    def ok(self) -> bool:
        return self.status in (LinkStatus.CODE_CREATED, LinkStatus.LINKED, LinkStatus.UNLINKED)


class WrongCodeThrottle:
    """Counts wrong link codes per account; after `limit` within `window` it refuses until the oldest ages out.

    Kept in memory by the one bot process: a restart forgets the counts, which costs
    little, since codes live minutes and have 50 bits. At most `max_accounts` accounts
    are tracked; the least recently failing are forgotten first.
    """

    def __init__(
        self, *, limit: int = 5, window: dt.timedelta = dt.timedelta(minutes=15), max_accounts: int = 10_000
    ) -> None:
        self.limit, self.window, self.max_accounts = limit, window, max_accounts
        self._failures: OrderedDict[Account, list[dt.datetime]] = OrderedDict()

    def _recent(self, account: Account, now: dt.datetime) -> list[dt.datetime]:
        recent = [t for t in self._failures.get(account, []) if now - t < self.window]
        if recent:
            self._failures[account] = recent
        else:
            self._failures.pop(account, None)
        return recent

    def wait(self, account: Account, now: dt.datetime) -> dt.timedelta | None:
        """How long the account must wait before trying a code again, or None if it may try now."""
        recent = self._recent(account, now)
        if len(recent) < self.limit:
            return None
        return recent[-self.limit] + self.window - now

    def failed(self, account: Account, now: dt.datetime) -> None:
        """Count one wrong code from the account."""
        recent = self._recent(account, now)
        self._failures[account] = [*recent, now]
        self._failures.move_to_end(account)
        while len(self._failures) > self.max_accounts:
            self._failures.popitem(last=False)

    def succeeded(self, account: Account) -> None:
        """Forget the account's wrong codes after it linked."""
        self._failures.pop(account, None)


def _platforms(accounts: list[str]) -> str:
    names = sorted({PLATFORM_NAMES[p] for p in accounts})
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


class AccountLinking:
    """The link, `link CODE` and unlink commands. One per bot process, since it holds the throttle.

    Every method works in the caller's session and transaction; the caller commits
    (also after a refusal: nothing is written then). `clock` gives aware UTC datetimes;
    tests pass their own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        throttle: WrongCodeThrottle | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.ttl_minutes = settings.link_code_ttl_minutes
        self.throttle = throttle or WrongCodeThrottle()
        self.clock = clock

    async def create_code(self, session: AsyncSession, *, account: Account, display_name: str) -> LinkResult:
        """A new one-time code for the account's user; it replaces any earlier code of theirs."""
        user = await user_for(session, account=account, display_name=display_name)
        code = new_code()
        expires_at = self.clock() + dt.timedelta(minutes=self.ttl_minutes)
        await add_link_code(session, user_id=user.id, code_hash=hash_code(code), expires_at=expires_at)
        return LinkResult(
            LinkStatus.CODE_CREATED,
            f"Your link code is {code}. Within {self.ttl_minutes} minutes, send `/link {code}` from your other "
            "account (Discord, Slack or the terminal) to join it to this one: both then share one history "
            "and this account's settings. The code works once; do not share it.",
        )

    async def redeem(
        self, session: AsyncSession, *, account: Account, display_name: str, code: str
    ) -> LinkResult:
        """Join the account (and everything of its user) to the user who made `code`."""
        now = self.clock()
        wait = self.throttle.wait(account, now)
        if wait is not None:
            minutes = max(1, math.ceil(wait.total_seconds() / 60))
            return LinkResult(
                LinkStatus.THROTTLED,
                "Too many wrong link codes from this account. "
                f"Try again in {minutes} minute{'s' * (minutes > 1)}.",
            )
        result = await self._redeem(session, account=account, display_name=display_name, code=code, now=now)
        if result.status == LinkStatus.LINKED:
            self.throttle.succeeded(account)
        elif result.status != LinkStatus.ALREADY_LINKED:
            self.throttle.failed(account, now)
        return result

    async def _redeem(
        self, session: AsyncSession, *, account: Account, display_name: str, code: str, now: dt.datetime
    ) -> LinkResult:
        stored = await self._find_code(session, code)
        if stored is None:
            return LinkResult(
                LinkStatus.WRONG_CODE,
                "That link code is not right. Check it, or send /link on your other account for a new one.",
            )
        user = await user_for(session, account=account, display_name=display_name)
        if stored.user_id == user.id:
            return LinkResult(
                LinkStatus.ALREADY_LINKED, "This account is already linked to the one that made that code."
            )
        if stored.expires_at <= now:
            return LinkResult(
                LinkStatus.EXPIRED_CODE,
                f"That link code has expired (codes last {self.ttl_minutes} minutes). "
                "Send /link on your other account for a new one.",
            )
        if not await use_link_code(session, code_id=stored.id, now=now):
            return LinkResult(
                LinkStatus.USED_CODE,
                "That link code was already used. Send /link on your other account for a new one.",
            )
        owner_accounts = await identities_of(session, user_id=stored.user_id)
        await merge_users(session, source_user_id=user.id, target_user_id=stored.user_id)
        return LinkResult(
            LinkStatus.LINKED,
            f"Linked. This account now shares history and settings with your "
            f"{_platforms([i.platform for i in owner_accounts])} account{'s' * (len(owner_accounts) > 1)}. "
            "Send /unlink here to separate it again.",
        )

    @staticmethod
    async def _find_code(session: AsyncSession, text: str) -> LinkCode | None:
        normalized = normalized_code(text)
        if normalized is None:
            return None
        digest = hash_code(normalized)
        stored = await find_link_code(session, code_hash=digest)
        # Found by its hash, so the lookup's timing tells nothing about the code; the
        # final comparison is constant-time all the same.
        if stored is None or not hmac.compare_digest(stored.code_hash, digest):
            return None
        return stored

    async def unlink(self, session: AsyncSession, *, account: Account) -> LinkResult:
        """Separate the account from the other accounts of its user; it starts afresh with a user of its own."""
        identity = await find_identity(
            session,
            platform=account.platform,
            workspace_id=account.workspace_id,
            platform_user_id=account.user_id,
        )
        if identity is None or len(await identities_of(session, user_id=identity.user_id)) < 2:
            return LinkResult(LinkStatus.NOT_LINKED, "This account is not linked to any other.")
        await detach_identity(session, identity_id=identity.id, today=self.clock().date())
        return LinkResult(
            LinkStatus.UNLINKED,
            "Unlinked. This account starts afresh; the history and settings stay with your other account.",
        )
