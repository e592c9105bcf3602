"""Account linking in SQL: one-time link codes (their hashes only), merging two users, detaching an account.

What a link does: the account that redeems a code joins the code owner's user, and
so does everything of the user it had: its other accounts, conversations with their
messages, token counts (summed per day) and link history. Preferences: the owner's
win; ones the owner never set are taken from the joining user. Then the joining
user is deleted. A ban on either user holds for the merged one.

What an unlink does: the account gets a fresh user of its own (banned if the user it
leaves is banned, carrying that user's token count for the day, so unlinking resets
neither); history and preferences stay with the user it leaves.

Both record an identity_events row. The caller commits, as everywhere in storage.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Conversation, Identity, IdentityEvent, LinkCode, Usage, User, UserSettings
from storage.repository import identity_query
from storage.usage import add_usage, usage_for
from storage.user_settings import PREFERENCE_COLUMNS


async def find_identity(
    session: AsyncSession, *, platform: str, workspace_id: str, platform_user_id: str
) -> Identity | None:
    """The identity of a platform account, or None if it never wrote to the bot."""
    return await session.scalar(
        identity_query(platform, workspace_id, platform_user_id).execution_options(populate_existing=True)
    )


async def identities_of(session: AsyncSession, *, user_id: int) -> list[Identity]:
    """Every platform account of the user, oldest first."""
    found = await session.scalars(
        select(Identity)
        .where(Identity.user_id == user_id)
        .order_by(Identity.id)
        .execution_options(populate_existing=True)
    )
    return list(found.all())


async def add_link_code(
    session: AsyncSession, *, user_id: int, code_hash: str, expires_at: dt.datetime
) -> LinkCode:
    """Store the hash of a new link code for the user; their earlier codes stop working. The caller commits."""
    await session.execute(delete(LinkCode).where(LinkCode.user_id == user_id))
    code = LinkCode(user_id=user_id, code_hash=code_hash, expires_at=expires_at)
    session.add(code)
    await session.flush()
    return code


async def find_link_code(session: AsyncSession, *, code_hash: str) -> LinkCode | None:
    """The link code with this hash, used or not, expired or not."""
    return await session.scalar(
        select(LinkCode).where(LinkCode.code_hash == code_hash).execution_options(populate_existing=True)
    )


async def use_link_code(session: AsyncSession, *, code_id: int, now: dt.datetime) -> bool:
    """Mark a code used if it is unused and unexpired at `now`; False if not. The caller commits.

    One conditional UPDATE, so of concurrent redemptions of one code exactly one wins.
    """
    used = await session.scalar(
        update(LinkCode)
        .where(LinkCode.id == code_id, LinkCode.used_at.is_(None), LinkCode.expires_at > now)
        .values(used_at=now)
        .returning(LinkCode.id)
    )
    return used is not None


async def prune_link_codes(session: AsyncSession, *, now: dt.datetime) -> int:
    """Delete codes that are used or expired at `now`; returns how many. The caller commits."""
    result = await session.execute(
        delete(LinkCode)
        .where(or_(LinkCode.used_at.is_not(None), LinkCode.expires_at <= now))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


async def _lock_users(session: AsyncSession, user_ids: list[int]) -> dict[int, User]:
    """Lock the users' rows (PostgreSQL) in id order, so concurrent links and unlinks cannot deadlock.

    SQLite needs no lock: every transaction there holds the write lock from BEGIN.
    """
    users = await session.scalars(
        select(User)
        .where(User.id.in_(user_ids))
        .order_by(User.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    found = {user.id: user for user in users}
    missing = set(user_ids) - set(found)
    if missing:
        raise LookupError(f"no user with id {sorted(missing)}")
    return found


async def _merge_preferences(session: AsyncSession, *, source_user_id: int, target_user_id: int) -> None:
    source = await session.get(UserSettings, source_user_id, populate_existing=True)
    if source is None:
        return
    target = await session.get(UserSettings, target_user_id, populate_existing=True)
    if target is None:
        target = UserSettings(user_id=target_user_id)
        session.add(target)
    for column in PREFERENCE_COLUMNS.values():
        if getattr(target, column) is None:
            setattr(target, column, getattr(source, column))
    await session.delete(source)


async def merge_users(session: AsyncSession, *, source_user_id: int, target_user_id: int) -> list[Identity]:
    """Move everything of the source user to the target user and delete the source (see the module's docstring).

    Returns the accounts that moved. The caller commits.
    """
    if source_user_id == target_user_id:
        raise ValueError("a user cannot be merged into itself")
    users = await _lock_users(session, [source_user_id, target_user_id])
    source, target = users[source_user_id], users[target_user_id]

    # Where both have an active conversation in one place, the target's stays active.
    target_places = select(Conversation.place).where(Conversation.user_id == target_user_id, Conversation.active)
    await session.execute(
        update(Conversation)
        .where(Conversation.user_id == source_user_id, Conversation.active, Conversation.place.in_(target_places))
        .values(active=False)
    )
    await session.execute(
        update(Conversation).where(Conversation.user_id == source_user_id).values(user_id=target_user_id)
    )
    await _merge_preferences(session, source_user_id=source_user_id, target_user_id=target_user_id)
    for usage in (await session.scalars(select(Usage).where(Usage.user_id == source_user_id))).all():
        await add_usage(session, user_id=target_user_id, day=usage.day, tokens=usage.tokens)
    await session.execute(
        update(IdentityEvent).where(IdentityEvent.user_id == source_user_id).values(user_id=target_user_id)
    )
    moved = await identities_of(session, user_id=source_user_id)
    await session.execute(
        update(Identity).where(Identity.user_id == source_user_id).values(user_id=target_user_id)
    )
    session.add_all(IdentityEvent(user_id=target_user_id, identity_id=i.id, action="link") for i in moved)
    target.banned = target.banned or source.banned
    target.last_seen_at = max(target.last_seen_at, source.last_seen_at)
    # Whatever is left of the source (its codes, usage and preferences rows) goes with it.
    await session.execute(delete(User).where(User.id == source_user_id))
    await session.flush()
    return await _refreshed(session, moved)


async def _refreshed(session: AsyncSession, identities: list[Identity]) -> list[Identity]:
    found = await session.scalars(
        select(Identity)
        .where(Identity.id.in_([i.id for i in identities]))
        .order_by(Identity.id)
        .execution_options(populate_existing=True)
    )
    return list(found.all())


async def detach_identity(session: AsyncSession, *, identity_id: int, today: dt.date) -> User:
    """Give an account a fresh user of its own (see the module's docstring) and return that user. The caller commits.

    Raises ValueError if it is its user's only account: there is nothing to detach it from.
    """
    identity = await session.get_one(Identity, identity_id, populate_existing=True)
    old = (await _lock_users(session, [identity.user_id]))[identity.user_id]
    if len(await identities_of(session, user_id=old.id)) < 2:
        raise ValueError("this is the user's only account")
    new = User(display_name=identity.display_name, banned=old.banned)
    session.add(new)
    await session.flush()
    identity.user_id = new.id
    tokens_today = await usage_for(session, user_id=old.id, day=today)
    if tokens_today:
        await add_usage(session, user_id=new.id, day=today, tokens=tokens_today)
    session.add(IdentityEvent(user_id=old.id, identity_id=identity.id, action="unlink"))
    await session.flush()
    return new
