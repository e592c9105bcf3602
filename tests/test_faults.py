"""Faults the bot rides out: the database going away and coming back, a request that breaks the model.

The outage is real: the bot's connections to the real PostgreSQL go through a TCP proxy
(tests/fakes/tcp_proxy.py) that the test cuts and restores, as a network or a database
restart would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from torch import Tensor

from bot.config import Settings
from bot.maintenance import prune_forever
from bot.messages import ErrorKind, Incoming, Reply
from bot.sessions import SessionManager
from model.checkpoint import LoadedModel
from model.engine import InferenceEngine
from model.gpt import GPT, KVCache
from storage.db import make_engine, make_session_factory
from storage.events import mark_event_processed
from storage.models import Message, ProcessedEvent, utcnow
from storage.turn_locks import TurnLocks

from fakes.reciting_model import recital, reciting_model
from fakes.tcp_proxy import TcpProxy

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL")  # as in conftest.py, which tests cannot import by name
SCRIPT = ["Fine", " thanks", ",", " and", " you", "?", " All", " good", " here", "."]


@pytest.fixture(scope="module")
def reciting() -> LoadedModel:
    return reciting_model(SCRIPT)


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[TcpProxy]:
    url = make_url(db_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.close()


def through(db_url: str, proxy: TcpProxy) -> str:
    return make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@dataclass
class Bot:
    manager: SessionManager
    db: AsyncEngine  # the bot's own engine, through the proxy


@pytest.fixture
async def bot(db_url: str, proxy: TcpProxy, reciting: LoadedModel) -> AsyncIterator[Bot]:
    """A SessionManager whose every database connection (queries and turn locks) goes through the proxy."""
    url = through(db_url, proxy)
    settings = Settings(_env_file=None, database_url=url, max_reply_tokens=600, rate_limit="0/minute")
    db = make_engine(url)
    locks = TurnLocks.for_database(url, pool_size=5, max_overflow=10, pool_timeout=30)
    engine = InferenceEngine(reciting)
    manager = SessionManager(settings, make_session_factory(db), engine, turn_locks=locks)
    yield Bot(manager, db)
    await manager.close()
    engine.close()
    await locks.close()
    await db.dispose()


def msg(text: str, user: str = "ann", **fields: Any) -> Incoming:
    return Incoming(platform="discord", user_id=user, display_name=user, text=text, **fields)


async def say(manager: SessionManager, incoming: Incoming) -> tuple[Reply, str]:
    reply = await manager.handle(incoming)
    return reply, await reply.collect()


async def stored(db_url: str) -> list[tuple[str, str, str]]:
    """(role, status, text) of every message, read past the proxy."""
    db = make_engine(db_url)
    try:
        async with make_session_factory(db)() as session:
            rows = await session.execute(select(Message.role, Message.status, Message.text).order_by(Message.id))
            return [tuple(row) for row in rows]  # type: ignore[misc]
    finally:
        await db.dispose()


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
@pytest.mark.skipif(not POSTGRES_URL, reason="TEST_DATABASE_URL is not set")
async def test_a_database_outage_gets_try_again_shortly_and_the_bot_recovers_by_itself(
    bot: Bot, proxy: TcpProxy, db_url: str
) -> None:
    reply = recital(SCRIPT, 600)
    assert (await say(bot.manager, msg("before")))[1] == reply

    streaming = await bot.manager.handle(msg("during"))  # its user turn is stored; the reply is being generated
    proxy.cut()
    refused, text = await say(bot.manager, msg("hello?", user="ben"))
    assert refused.error == ErrorKind.UNAVAILABLE and "temporarily unavailable" in text and "try again shortly" in text
    command, text = await say(bot.manager, msg("/history", user="cid"))
    assert command.error == ErrorKind.UNAVAILABLE and "try again shortly" in text
    assert await streaming.collect() == reply, "a reply under way streams to its end"
    await asyncio.sleep(1.0)  # its store fails meanwhile, and is retried
    await proxy.restore()

    after, text = await say(bot.manager, msg("after"))
    assert after.error is None and text == reply
    again, text = await say(bot.manager, msg("hello again", user="ben"))
    assert again.error is None and text == reply
    await bot.manager.close()  # replies are stored just after they end
    assert await stored(db_url) == [
        ("user", "ok", "before"), ("bot", "ok", reply),
        ("user", "ok", "during"), ("bot", "ok", reply),  # stored once the database was back, before "after"
        ("user", "ok", "after"), ("bot", "ok", reply),
        ("user", "ok", "hello again"), ("bot", "ok", reply),
    ]


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
@pytest.mark.skipif(not POSTGRES_URL, reason="TEST_DATABASE_URL is not set")
async def test_pruning_backs_off_while_the_database_is_away_and_goes_on_when_it_returns(
    db_url: str, proxy: TcpProxy
) -> None:
    direct = make_engine(db_url)
    async with make_session_factory(direct)() as session, session.begin():
        await mark_event_processed(session, platform="slack", event_id="old")
        (await session.get_one(ProcessedEvent, ("slack", "old"))).created_at = utcnow() - dt.timedelta(days=3)
    through_proxy = make_engine(through(db_url, proxy))
    settings = Settings(_env_file=None, database_url=db_url)
    proxy.cut()
    job = asyncio.create_task(prune_forever(settings, make_session_factory(through_proxy), every=3600, retry=0.05))
    try:
        await asyncio.sleep(0.5)  # rounds at 0, 0.05, 0.15, 0.35 s fail
        assert not job.done()
        await proxy.restore()
        async with asyncio.timeout(10):
            while await _event_ids(direct):
                await asyncio.sleep(0.05)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        await through_proxy.dispose()
        await direct.dispose()


async def _event_ids(db: AsyncEngine) -> list[str]:
    async with make_session_factory(db)() as session:
        return list(await session.scalars(select(ProcessedEvent.event_id)))


class PrefillOutOfMemory(GPT):
    """Runs out of memory in the prefill of any prompt holding the token `poison`, as CUDA would."""

    poison = -1

    def forward_last(self, idx: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        if bool((idx == self.poison).any()):
            raise torch.OutOfMemoryError("out of memory")
        return super().forward_last(idx, kv_cache, start_pos)


async def test_a_message_that_breaks_the_model_gets_an_error_and_the_others_are_answered(
    db_url: str, reciting: LoadedModel
) -> None:
    model = PrefillOutOfMemory(reciting.config).eval()
    model.load_state_dict(reciting.model.state_dict())
    model.poison = reciting.tokenizer.encode("§")[0]
    engine = InferenceEngine(LoadedModel(model=model, tokenizer=reciting.tokenizer, name="oom", config=model.config))
    db = make_engine(db_url)
    # a short persona and reply: the reciting model's window is 64 tokens, and the message must fit in whole
    settings = Settings(_env_file=None, database_url=db_url, persona="Hi.", max_reply_tokens=10, rate_limit="0/minute")
    manager = SessionManager(settings, make_session_factory(db), engine)
    try:
        results = await asyncio.gather(
            say(manager, msg("hi")), say(manager, msg("§§§", user="ben")), say(manager, msg("hey", user="cid"))
        )
        await manager.close()
    finally:
        engine.close()
        await db.dispose()
    texts = [text for _, text in results]
    assert texts[0] == texts[2] == recital(SCRIPT, 10)
    assert "something went wrong" in texts[1]
    rows = await stored(db_url)
    assert sorted(rows) == sorted([
        ("user", "ok", "hi"), ("bot", "ok", texts[0]),
        ("user", "ok", "§§§"), ("bot", "failed", ""),
        ("user", "ok", "hey"), ("bot", "ok", texts[2]),
    ])
