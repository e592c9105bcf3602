"""Message text survives the database unchanged, except NUL characters, which are removed."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import Message
from storage.repository import add_message, get_active_conversation, get_or_create_user

TRICKY_TEXTS = [
    "",
    "héllo wörld — ünïcödé",
    "👋🏽 family: 👨‍👩‍👧‍👦 flags: 🇺🇦🇯🇵",
    "עברית and العربية mixed with English",
    "\u200b\u200d\ufeff zero-width",
    "it's \"quoted\" `code` \\backslash\\ %s %(name)s {0} $1 ?",
    "'; DROP TABLE messages; --",
    "Robert'); DELETE FROM users WHERE ('1'='1",
    "line one\nline two\r\n\ttabbed",
    "x" * 20_000,
    ("🙂 ünï 'q' " * 2_000)[:20_000],
]


async def _store_and_reload(session_factory: async_sessionmaker[AsyncSession], text: str) -> str:
    async with session_factory() as session:
        user = await get_or_create_user(
            session, platform="console", workspace_id="", platform_user_id="me", display_name="me"
        )
        conversation = await get_active_conversation(
            session, user_id=user.id, platform="console", place="console", is_dm=True
        )
        message = await add_message(
            session, conversation_id=conversation.id, role="user", text=text, token_count=0
        )
        await session.commit()
    # A fresh session, so the text comes from the database, not the identity map.
    async with session_factory() as session:
        stored = await session.get_one(Message, message.id)
        return stored.text


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=range(len(TRICKY_TEXTS)))
async def test_tricky_text_round_trips(session_factory: async_sessionmaker[AsyncSession], text: str) -> None:
    assert await _store_and_reload(session_factory, text) == text


@settings(
    max_examples=40,
    deadline=None,
    # One database for all examples is fine: each example reads back its own row.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=st.text(max_size=300))
@example(text="a\x00b")
async def test_any_text_round_trips_without_nul(
    session_factory: async_sessionmaker[AsyncSession], text: str
) -> None:
    assert await _store_and_reload(session_factory, text) == text.replace("\x00", "")


async def test_nul_characters_are_removed(session_factory: async_sessionmaker[AsyncSession]) -> None:
    assert await _store_and_reload(session_factory, "\x00a\x00\x00b\x00") == "ab"
