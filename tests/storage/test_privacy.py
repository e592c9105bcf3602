"""A user's own data: recent history, a JSON export of everything, and forgetting it for good."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.linking import add_link_code, identities_of, merge_users
from storage.models import Conversation, LinkCode, Message, User, UserSettings
from storage.privacy import export_user_data, forget_user_data, recent_history
from storage.repository import add_message, get_active_conversation, get_or_create_user, start_new_conversation
from storage.usage import add_usage, usage_for
from storage.user_settings import set_preference

DAY = dt.date(2025, 3, 14)
CODE_HASH = hashlib.sha256(b"ABCDEFGHJK").hexdigest()


async def _ann(session: AsyncSession) -> User:
    """Ann with two linked accounts, two places, a reset conversation, settings, usage and a link code."""
    ann = await get_or_create_user(session, platform="discord", workspace_id="G1", platform_user_id="1", display_name="Ann")
    slack = await get_or_create_user(session, platform="slack", workspace_id="T1", platform_user_id="U1", display_name="Ann S")
    await merge_users(session, source_user_id=slack.id, target_user_id=ann.id)
    for place, texts in (("discord:dm", ["d1", "d2"]), ("slack:T1:C1", ["s1"])):
        conversation = await get_active_conversation(
            session, user_id=ann.id, platform=place.split(":")[0], place=place, is_dm=place.endswith("dm")
        )
        for text in texts:
            await add_message(session, conversation_id=conversation.id, role="user", text=text, token_count=1)
    fresh = await start_new_conversation(session, user_id=ann.id, platform="discord", place="discord:dm", is_dm=True)
    await add_message(session, conversation_id=fresh.id, role="bot", text="d3", token_count=2, model_name="m", generation_ms=5)
    await set_preference(session, user_id=ann.id, name="persona", value="Ann's persona")
    await add_usage(session, user_id=ann.id, day=DAY, tokens=12)
    await add_link_code(session, user_id=ann.id, code_hash=CODE_HASH, expires_at=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    await session.commit()
    return ann


async def test_recent_history_spans_conversations_oldest_first(session: AsyncSession) -> None:
    ann = await _ann(session)
    assert [m.text for m in await recent_history(session, user_id=ann.id, limit=10)] == ["d1", "d2", "s1", "d3"]
    assert [m.text for m in await recent_history(session, user_id=ann.id, limit=2)] == ["s1", "d3"]


async def test_export_holds_everything_and_is_json(session: AsyncSession) -> None:
    ann = await _ann(session)
    data = await export_user_data(session, user_id=ann.id)
    text = json.dumps(data)

    assert CODE_HASH not in text
    assert data["user"]["display_name"] == "Ann"
    assert [a["account"] for a in data["accounts"]] == ["discord:G1/1", "slack:T1/U1"]
    assert data["settings"]["persona"] == "Ann's persona"
    assert [[m["text"] for m in c["messages"]] for c in data["conversations"]] == [["d1", "d2"], ["s1"], ["d3"]]
    assert [c["active"] for c in data["conversations"]] == [False, True, True]
    assert data["conversations"][2]["messages"][0] | {"created_at": None} == {
        "role": "bot",
        "text": "d3",
        "created_at": None,
        "token_count": 2,
        "status": "ok",
        "model_name": "m",
        "generation_ms": 5,
    }
    assert data["usage"] == [{"day": "2025-03-14", "tokens": 12}]
    assert [(e["action"], e["account"]) for e in data["account_links"]] == [("link", "slack:T1/U1")]
    assert dt.datetime.fromisoformat(data["user"]["created_at"]).tzinfo is not None


async def test_export_of_a_missing_user_raises(session: AsyncSession) -> None:
    with pytest.raises(LookupError):
        await export_user_data(session, user_id=4242)


async def _count(session: AsyncSession, model: type) -> int:
    return await session.scalar(select(func.count()).select_from(model)) or 0


async def test_forget_deletes_messages_settings_and_codes_for_good(session: AsyncSession) -> None:
    ann = await _ann(session)
    ann.banned = True
    await session.commit()

    assert await forget_user_data(session, user_id=ann.id) == 4
    await session.commit()
    session.expunge_all()

    for model in (Message, Conversation, UserSettings, LinkCode):
        assert await _count(session, model) == 0, model.__name__
    # Kept: the user (with the ban), their accounts and the day's token count.
    assert (await session.get_one(User, ann.id)).banned
    assert len(await identities_of(session, user_id=ann.id)) == 2
    assert await usage_for(session, user_id=ann.id, day=DAY) == 12
    data = await export_user_data(session, user_id=ann.id)
    assert data["conversations"] == [] and data["settings"] is None


async def test_after_forgetting_the_user_starts_afresh(session: AsyncSession) -> None:
    ann = await _ann(session)
    await forget_user_data(session, user_id=ann.id)
    conversation = await get_active_conversation(session, user_id=ann.id, platform="discord", place="discord:dm", is_dm=True)
    await add_message(session, conversation_id=conversation.id, role="user", text="new", token_count=1)
    await session.commit()
    assert [m.text for m in await recent_history(session, user_id=ann.id, limit=10)] == ["new"]
