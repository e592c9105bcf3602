"""Data access: one small query per function, the session passed in by keyword.

Transactions: callers own them. No function here commits or rolls back; each one
flushes what it wrote so ids and defaults are filled in, and the caller commits the
unit of work (typically one incoming message) with ``await session.commit()``.

The get-or-create functions are safe when several sessions race to create the same
row: they insert with ``INSERT ... ON CONFLICT DO NOTHING`` and re-read the winner's
row, so they need no savepoint and never leave the transaction in a failed state.
On PostgreSQL the losing INSERT waits until the winning transaction commits; on
SQLite every transaction takes the write lock at BEGIN (see storage.db), so racing
sessions simply run one after another.

Text: PostgreSQL cannot store NUL ("\\x00") in text columns, so every stored string
has its NUL characters removed, on SQLite too, so both backends keep the same text.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    DISPLAY_NAME_LENGTH,
    MESSAGE_ROLES,
    MESSAGE_STATUSES,
    PLATFORMS,
    Conversation,
    Identity,
    Message,
    User,
    UserSettings,
    utcnow,
)


LAST_SEEN_RESOLUTION = dt.timedelta(minutes=1)


def strip_nul(text: str) -> str:
    """The text without NUL characters, which PostgreSQL cannot store in text columns."""
    return text.replace("\x00", "")


def dialect_insert(session: AsyncSession, model: type) -> postgresql.Insert | sqlite.Insert:
    """A dialect-specific INSERT that supports ON CONFLICT, for upserts in every storage module."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"no upsert for the {dialect!r} dialect")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def identity_query(platform: str, workspace_id: str, platform_user_id: str) -> Select[tuple[Identity]]:
    """The query for the identity of one platform account."""
    return select(Identity).where(
        Identity.platform == platform,
        Identity.workspace_id == workspace_id,
        Identity.platform_user_id == platform_user_id,
    )


class Owner(NamedTuple):
    """A platform account's user and that user's stored preference overrides (None when never set)."""

    user: User
    settings: UserSettings | None


async def get_or_create_user(
    session: AsyncSession,
    *,
    platform: str,
    workspace_id: str,
    platform_user_id: str,
    display_name: str,
) -> User:
    """The user behind a platform account, created with its identity on first contact (see account_owner)."""
    owner = await account_owner(
        session,
        platform=platform,
        workspace_id=workspace_id,
        platform_user_id=platform_user_id,
        display_name=display_name,
    )
    return owner.user


async def account_owner(
    session: AsyncSession,
    *,
    platform: str,
    workspace_id: str,
    platform_user_id: str,
    display_name: str,
) -> Owner:
    """The user behind a platform account, created with its identity on first contact, and their settings.

    Also records that the user was seen now and keeps the identity's display name
    current (NULs removed, cut to DISPLAY_NAME_LENGTH); last_seen_at is kept to
    LAST_SEEN_RESOLUTION. Race-safe: concurrent first contacts for one account, each in its own
    session, all get the same single user. The caller commits.
    """
    _check_choice("platform", platform, PLATFORMS)
    # Cut to the column's length: PostgreSQL would refuse a longer name, SQLite keep it.
    display_name = strip_nul(display_name)[:DISPLAY_NAME_LENGTH]
    now = utcnow()
    # Identity, user and settings in one round trip: this runs for every message.
    found = (
        await session.execute(
            identity_query(platform, workspace_id, platform_user_id)
            .add_columns(User, UserSettings)
            .join(User, User.id == Identity.user_id)
            .outerjoin(UserSettings, UserSettings.user_id == User.id)
            .execution_options(populate_existing=True)
        )
    ).first()
    if found is None:
        identity = await _create_identity(
            session,
            platform=platform,
            workspace_id=workspace_id,
            platform_user_id=platform_user_id,
            display_name=display_name,
        )
        user = await session.get_one(User, identity.user_id)
        settings = await session.get(UserSettings, identity.user_id)  # another session may have won the race
    else:
        identity, user, settings = found._tuple()
    if identity.display_name != display_name:
        identity.display_name = display_name
    # Recorded to the minute, so a busy user's every message does not rewrite their row.
    if now - user.last_seen_at >= LAST_SEEN_RESOLUTION:
        user.last_seen_at = now
    await session.flush()
    return Owner(user, settings)


async def _create_identity(
    session: AsyncSession,
    *,
    platform: str,
    workspace_id: str,
    platform_user_id: str,
    display_name: str,
) -> Identity:
    """Insert a new user and its identity; if another session won the race, use theirs."""
    user = User(display_name=display_name)
    session.add(user)
    await session.flush()
    inserted = await session.scalar(
        dialect_insert(session, Identity)
        .values(
            user_id=user.id,
            platform=platform,
            workspace_id=workspace_id,
            platform_user_id=platform_user_id,
            display_name=display_name,
        )
        .on_conflict_do_nothing(index_elements=["platform", "workspace_id", "platform_user_id"])
        .returning(Identity.id)
    )
    if inserted is None:
        # Someone else created this account first: drop our user and use theirs.
        await session.delete(user)
        await session.flush()
    identity = await session.scalar(
        identity_query(platform, workspace_id, platform_user_id).execution_options(populate_existing=True)
    )
    assert identity is not None, "the identity was inserted or already existed"
    return identity


async def get_active_conversation(
    session: AsyncSession, *, user_id: int, platform: str, place: str, is_dm: bool
) -> Conversation:
    """The user's active conversation in `place`, started if there is none. Race-safe; the caller commits."""
    conversation = await _find_active_conversation(session, user_id=user_id, place=place)
    if conversation is not None:
        return conversation
    return await _insert_active_conversation(
        session, user_id=user_id, platform=platform, place=place, is_dm=is_dm
    )


async def start_new_conversation(
    session: AsyncSession, *, user_id: int, platform: str, place: str, is_dm: bool
) -> Conversation:
    """Deactivate the user's conversation in `place` and start a fresh one. The caller commits.

    Two concurrent resets of one place end with a single new active conversation,
    which both calls return.
    """
    await session.execute(
        update(Conversation)
        .where(Conversation.user_id == user_id, Conversation.place == place, Conversation.active)
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    return await _insert_active_conversation(
        session, user_id=user_id, platform=platform, place=place, is_dm=is_dm
    )


async def _find_active_conversation(
    session: AsyncSession, *, user_id: int, place: str
) -> Conversation | None:
    return await session.scalar(
        select(Conversation)
        .where(Conversation.user_id == user_id, Conversation.place == place, Conversation.active)
        .execution_options(populate_existing=True)
    )


async def _insert_active_conversation(
    session: AsyncSession, *, user_id: int, platform: str, place: str, is_dm: bool
) -> Conversation:
    _check_choice("platform", platform, PLATFORMS)
    await session.execute(
        dialect_insert(session, Conversation)
        .values(user_id=user_id, platform=platform, place=place, is_dm=is_dm, active=True)
        .on_conflict_do_nothing(
            index_elements=["user_id", "place"], index_where=Conversation.active
        )
    )
    conversation = await _find_active_conversation(session, user_id=user_id, place=place)
    assert conversation is not None, "the conversation was inserted or already existed"
    return conversation


async def add_message(
    session: AsyncSession,
    *,
    conversation_id: int,
    role: str,
    text: str,
    token_count: int,
    model_name: str | None = None,
    generation_ms: int | None = None,
    status: str = "ok",
) -> Message:
    """Append a message to a conversation; NUL characters are removed from `text`. The caller commits."""
    _check_choice("role", role, MESSAGE_ROLES)
    _check_choice("status", status, MESSAGE_STATUSES)
    message = Message(
        conversation_id=conversation_id,
        role=role,
        text=strip_nul(text),
        token_count=token_count,
        model_name=model_name,
        generation_ms=generation_ms,
        status=status,
    )
    session.add(message)
    await session.flush()
    return message


async def update_message(
    session: AsyncSession,
    *,
    message_id: int,
    text: str | None = None,
    token_count: int | None = None,
    generation_ms: int | None = None,
    status: str | None = None,
) -> Message:
    """Change the given fields of a message, e.g. to finish a streamed bot turn. The caller commits.

    Raises LookupError if there is no such message.
    """
    message = await session.get(Message, message_id)
    if message is None:
        raise LookupError(f"no message with id {message_id}")
    if text is not None:
        message.text = strip_nul(text)
    if token_count is not None:
        message.token_count = token_count
    if generation_ms is not None:
        message.generation_ms = generation_ms
    if status is not None:
        _check_choice("status", status, MESSAGE_STATUSES)
        message.status = status
    await session.flush()
    return message


class StoredTurn(NamedTuple):
    """What a prompt needs of a stored message: plain columns, no ORM object to build per row."""

    id: int
    role: str
    text: str
    status: str


async def recent_messages(session: AsyncSession, *, conversation_id: int, limit: int) -> list[StoredTurn]:
    """The newest `limit` messages of a conversation, oldest first."""
    newest_first = await session.execute(
        select(Message.id, Message.role, Message.text, Message.status)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.id.desc())
        .limit(limit)
    )
    return [StoredTurn(*row) for row in reversed(newest_first.all())]


async def active_history(
    session: AsyncSession, *, user_id: int, platform: str, place: str, is_dm: bool, limit: int
) -> tuple[int, list[StoredTurn]]:
    """The id of the user's active conversation in `place` (started if there is none) and its newest
    `limit` messages, oldest first: one round trip in the usual case, as this runs for every message.
    """
    rows = (
        await session.execute(
            select(Conversation.id, Message.id, Message.role, Message.text, Message.status)
            .outerjoin(Message, Message.conversation_id == Conversation.id)
            .where(Conversation.user_id == user_id, Conversation.place == place, Conversation.active)
            .order_by(Message.id.desc())
            .limit(max(limit, 1))
        )
    ).all()
    if not rows:
        conversation = await get_active_conversation(
            session, user_id=user_id, platform=platform, place=place, is_dm=is_dm
        )
        return conversation.id, []
    turns = [StoredTurn(*row[1:]) for row in reversed(rows) if row[1] is not None]
    return rows[0][0], turns if limit else []


async def count_messages(session: AsyncSession, *, user_id: int | None = None) -> int:
    """How many messages are stored, in all or in one user's conversations."""
    query = select(func.count(Message.id))
    if user_id is not None:
        query = query.join(Conversation, Conversation.id == Message.conversation_id).where(
            Conversation.user_id == user_id
        )
    return (await session.scalar(query)) or 0


async def prune_old_messages(session: AsyncSession, *, older_than: dt.datetime) -> int:
    """Delete every message created before `older_than` (retention); returns how many. The caller commits.

    One statement over the whole table (messages.created_at has no index): meant for a
    daily job, not for every message.
    """
    result = await session.execute(
        delete(Message).where(Message.created_at < older_than).execution_options(synchronize_session=False)
    )
    return result.rowcount
