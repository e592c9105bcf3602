"""A user's own data: their recent history, an export of everything stored about them, and forgetting it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Conversation, Identity, IdentityEvent, LinkCode, Message, Usage, User, UserSettings
from storage.repository import count_messages


async def recent_history(session: AsyncSession, *, user_id: int, limit: int) -> list[Message]:
    """The user's newest `limit` messages over all their conversations and places, oldest first."""
    newest_first = await session.scalars(
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.user_id == user_id)
        .order_by(Message.id.desc())
        .limit(limit)
    )
    return list(reversed(newest_first.all()))


def _time(value: dt.datetime | dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


def _account(i: Identity) -> str:
    scope = f"{i.workspace_id}/" if i.workspace_id else ""
    return f"{i.platform}:{scope}{i.platform_user_id}"


def _message(m: Message) -> dict[str, Any]:
    return {
        "role": m.role,
        "text": m.text,
        "created_at": _time(m.created_at),
        "token_count": m.token_count,
        "status": m.status,
        "model_name": m.model_name,
        "generation_ms": m.generation_ms,
    }


async def export_user_data(session: AsyncSession, *, user_id: int) -> dict[str, Any]:
    """Everything stored about the user, as plain data ready for json.dumps.

    Link codes are left out: only their hashes are stored, and those are no one's business.
    Raises LookupError if there is no such user.
    """
    user = await session.get(User, user_id)
    if user is None:
        raise LookupError(f"no user with id {user_id}")
    identities = await session.scalars(select(Identity).where(Identity.user_id == user_id).order_by(Identity.id))
    settings = await session.get(UserSettings, user_id)
    conversations = (
        await session.scalars(select(Conversation).where(Conversation.user_id == user_id).order_by(Conversation.id))
    ).all()
    messages = await session.scalars(
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.user_id == user_id)
        .order_by(Message.id)
    )
    by_conversation: dict[int, list[dict[str, Any]]] = {c.id: [] for c in conversations}
    for message in messages:
        by_conversation[message.conversation_id].append(_message(message))
    usage = await session.scalars(select(Usage).where(Usage.user_id == user_id).order_by(Usage.day))
    events = await session.execute(
        select(IdentityEvent, Identity)
        .outerjoin(Identity, Identity.id == IdentityEvent.identity_id)
        .where(IdentityEvent.user_id == user_id)
        .order_by(IdentityEvent.id)
    )
    return {
        "user": {
            "display_name": user.display_name,
            "banned": user.banned,
            "created_at": _time(user.created_at),
            "last_seen_at": _time(user.last_seen_at),
        },
        "accounts": [
            {
                "account": _account(i),
                "display_name": i.display_name,
                "since": _time(i.created_at),
            }
            for i in identities
        ],
        "settings": None
        if settings is None
        else {
            "persona": settings.persona,
            "temperature": settings.temperature,
            "max_reply_tokens": settings.max_reply_tokens,
            "display_name": settings.display_name_override,
            "updated_at": _time(settings.updated_at),
        },
        "conversations": [
            {
                "platform": c.platform,
                "place": c.place,
                "is_dm": c.is_dm,
                "active": c.active,
                "created_at": _time(c.created_at),
                "messages": by_conversation[c.id],
            }
            for c in conversations
        ],
        "usage": [{"day": _time(u.day), "tokens": u.tokens} for u in usage],
        "account_links": [
            {"action": e.action, "account": _account(i) if i else None, "at": _time(e.created_at)}
            for e, i in events
        ],
    }


async def forget_user_data(session: AsyncSession, *, user_id: int) -> int:
    """Delete the user's conversations and messages, settings and link codes; returns how many messages.

    Kept: the user and their accounts (so a ban still holds and the account is still
    known), the tokens counted per day (so forgetting does not reset a quota) and the
    record of account links. None of these hold anything the user wrote. The caller commits.
    """
    deleted = await count_messages(session, user_id=user_id)
    # Messages go with their conversations (ON DELETE CASCADE).
    for model in (Conversation, UserSettings, LinkCode):
        await session.execute(delete(model).where(model.user_id == user_id))
    return deleted
