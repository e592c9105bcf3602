"""Several bot processes on one PostgreSQL database: one turn at a time per user and place, each event once.

Two real run_bot.py processes take turns for one user; two SessionManagers with engines,
connection pools and turn locks of their own (as two processes have) race on one event
and on one conversation; processes starting together migrate one after another.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.config import Settings
from bot.messages import ErrorKind, Incoming, Reply
from bot.sessions import SessionManager
from model.checkpoint import LoadedModel
from model.engine import InferenceEngine
from storage.db import current_revision, make_engine, make_session_factory, migrate
from storage.models import Message
from storage.turn_locks import TurnLocks

from fakes.reciting_model import recital, reciting_model
from processes import bot_env, output, reciting_model_folder, running_bot, send

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL")  # as in conftest.py, which tests cannot import by name
pytestmark = [
    pytest.mark.skipif(not POSTGRES_URL, reason="TEST_DATABASE_URL is not set"),
    pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True),
]
SCRIPT = ["One", " at", " a", " time", ",", " please", "."]


async def stored(db_url: str) -> list[tuple[int, str, str, str]]:
    """(conversation, role, status, text) of every message."""
    db = make_engine(db_url)
    try:
        async with make_session_factory(db)() as session:
            rows = await session.execute(
                select(Message.conversation_id, Message.role, Message.status, Message.text).order_by(Message.id)
            )
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        await db.dispose()


async def test_two_processes_answer_one_user_one_turn_at_a_time_in_order(db_url: str, tmp_path: Path) -> None:
    reply_tokens = 1500  # a second or more of generation: long enough for the other process to barge in
    env = bot_env(db_url, reciting_model_folder(tmp_path / "model", SCRIPT), BOT_MAX_REPLY_TOKENS=str(reply_tokens))
    with running_bot(tmp_path / "a", env) as a, running_bot(tmp_path / "b", env) as b:
        for n, bot in enumerate([a, b, a, b]):
            send(bot, f"message {n}")
            # Stored means its turn has begun: the next message goes to the other process mid-reply.
            async with asyncio.timeout(120):
                while ("user", f"message {n}") not in [(row[1], row[3]) for row in await stored(db_url)]:
                    assert a.poll() is None and b.poll() is None, output(tmp_path / "a")[1] + output(tmp_path / "b")[1]
                    await asyncio.sleep(0.02)
        for bot in (a, b):
            assert bot.stdin is not None
            bot.stdin.close()  # end of input: each finishes its reply and exits
        assert [await asyncio.to_thread(bot.wait, 120) for bot in (a, b)] == [0, 0]
    reply = recital(SCRIPT, reply_tokens)
    assert output(tmp_path / "a")[0] == output(tmp_path / "b")[0] == [reply, reply]
    rows = await stored(db_url)
    assert [row[1:] for row in rows] == [
        turn for n in range(4) for turn in (("user", "ok", f"message {n}"), ("bot", "ok", reply))
    ], "each reply follows its own message, before the next message is taken"
    assert len({row[0] for row in rows}) == 1, f"one conversation of {getpass.getuser()} in the terminal"


@pytest.fixture
async def two_managers(db_url: str) -> AsyncIterator[tuple[SessionManager, SessionManager]]:
    """Two SessionManagers as two processes have them: own database engine, turn locks and inference engine."""
    loaded: LoadedModel = reciting_model(SCRIPT)
    settings = Settings(_env_file=None, database_url=db_url, persona="Hi.", max_reply_tokens=200, rate_limit="0/minute")
    parts = []
    for _ in range(2):
        db = make_engine(db_url)
        locks = TurnLocks.for_database(db_url, pool_size=5, max_overflow=10, pool_timeout=30)
        engine = InferenceEngine(loaded)
        parts.append((db, locks, engine, SessionManager(settings, make_session_factory(db), engine, turn_locks=locks)))
    yield parts[0][3], parts[1][3]
    for db, locks, engine, manager in parts:
        await manager.close()
        engine.close()
        await locks.close()
        await db.dispose()


def msg(text: str, **fields: Any) -> Incoming:
    return Incoming(platform="slack", workspace_id="T1", user_id="U1", display_name="ann", text=text, **fields)


async def say(manager: SessionManager, incoming: Incoming) -> tuple[Reply, str]:
    reply = await manager.handle(incoming)
    return reply, await reply.collect()


async def test_one_event_delivered_to_both_processes_is_answered_once(
    two_managers: tuple[SessionManager, SessionManager], db_url: str
) -> None:
    event = msg("hello", event_id="Ev42")
    (first, first_text), (second, second_text) = await asyncio.gather(*(say(m, event) for m in two_managers))
    assert {first.error, second.error} == {None, ErrorKind.DUPLICATE}
    assert sorted([first_text, second_text]) == ["", recital(SCRIPT, 200)]
    await asyncio.gather(*(m.close() for m in two_managers))  # replies are stored just after they end
    assert [row[1:3] for row in await stored(db_url)] == [("user", "ok"), ("bot", "ok")]


async def test_racing_messages_of_one_user_take_turns_across_managers(
    two_managers: tuple[SessionManager, SessionManager], db_url: str
) -> None:
    one, other = two_managers
    incoming = [(one if n % 2 else other, msg(f"message {n}")) for n in range(6)]
    replies = await asyncio.gather(*(say(manager, m) for manager, m in incoming))
    assert [text for _, text in replies] == [recital(SCRIPT, 200)] * 6
    await asyncio.gather(one.close(), other.close())  # replies are stored just after they end
    rows = await stored(db_url)
    assert [row[1] for row in rows] == ["user", "bot"] * 6, "never two turns at once"
    assert sorted(row[3] for row in rows if row[1] == "user") == [f"message {n}" for n in range(6)]


async def test_processes_starting_together_migrate_one_after_another(empty_db_url: str) -> None:
    engines = [make_engine(empty_db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        revisions = {await current_revision(engine) for engine in engines}
    finally:
        for engine in engines:
            await engine.dispose()
    assert len(revisions) == 1 and None not in revisions


async def test_a_turn_cancelled_while_waiting_for_its_lock_leaves_nothing_behind(db_url: str) -> None:
    holder, waiter = (TurnLocks.for_database(db_url, pool_size=1, max_overflow=0, pool_timeout=5) for _ in range(2))
    try:
        async with holder.hold("slack", "T1", "U1", "place"):
            waiting = asyncio.create_task(_hold_briefly(waiter))
            await asyncio.sleep(0.3)  # it waits in pg_advisory_xact_lock
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        async with asyncio.timeout(5):  # the lock is free, and the cancelled one's connection usable again
            await _hold_briefly(waiter)
            await _hold_briefly(holder)
    finally:
        await holder.close()
        await waiter.close()


async def _hold_briefly(locks: TurnLocks) -> None:
    async with locks.hold("slack", "T1", "U1", "place"):
        await asyncio.sleep(0)


async def test_turns_of_different_people_get_the_lock_connections_first_come_first_served(db_url: str) -> None:
    locks = TurnLocks.for_database(db_url, pool_size=1, max_overflow=1, pool_timeout=30)
    order: list[str] = []

    async def turn(name: str, again: bool = False) -> None:
        async with locks.hold("discord", "", name, "place"):
            order.append(name)
            await asyncio.sleep(0.05)
        if again:  # someone who asks again at once goes to the back of the line
            await turn(name + " again")

    try:
        first = [asyncio.create_task(turn(name, again=True)) for name in ("a", "b")]
        await asyncio.sleep(0.02)  # a and b hold both connections
        waiting = []
        for name in ("c", "d", "e"):
            waiting.append(asyncio.create_task(turn(name)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*first, *waiting)
    finally:
        await locks.close()
    # Two connections, freed in pairs: each pair of turns gets them together and records itself
    # in either order. c and d come before a and b's second turns, which went to the back of the
    # line; e comes with the first of those, in the same pair.
    assert sorted(order[:2]) == ["a", "b"]
    assert sorted(order[2:4]) == ["c", "d"]
    assert "e" in order[4:6] and sorted(order[4:]) == ["a again", "b again", "e"]
