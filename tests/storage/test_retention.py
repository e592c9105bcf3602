"""Retention: messages older than the cut-off are deleted for good, newer ones stay."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Message, utcnow
from storage.repository import (
    add_message,
    count_messages,
    get_active_conversation,
    get_or_create_user,
    prune_old_messages,
)


async def test_old_messages_are_pruned(session: AsyncSession) -> None:
    now = utcnow()
    user = await get_or_create_user(session, platform="console", workspace_id="", platform_user_id="me", display_name="me")
    conversation = await get_active_conversation(session, user_id=user.id, platform="console", place="console", is_dm=True)
    for age_days, text in ((40, "ancient"), (31, "old"), (29, "recent"), (0, "today")):
        message = await add_message(session, conversation_id=conversation.id, role="user", text=text, token_count=1)
        message.created_at = now - dt.timedelta(days=age_days)
    await session.commit()

    assert await prune_old_messages(session, older_than=now - dt.timedelta(days=30)) == 2
    await session.commit()

    assert (await session.scalars(select(Message.text).order_by(Message.id))).all() == ["recent", "today"]
    assert await count_messages(session, user_id=user.id) == 2
    assert await prune_old_messages(session, older_than=now - dt.timedelta(days=30)) == 0
